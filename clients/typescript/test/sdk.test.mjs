// @mqtt-im/client against a real mqtt-im (started by the Rust suite, tests/client/typescript.rs,
// which sets BROKER_URL and creates users t1..t20 and s1..s100 with password "pw", digest
// previews of 1,
// and names the mqtt-im binary in MQTT_IM_BIN for the test that SIGKILLs a broker of its own).
// A TCP proxy of the test's own drops the network or loses the server's answers.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import "fake-indexeddb/auto";
import mqtt from "mqtt";
import { Client, MemoryStore, IndexedDbStore, pb } from "../dist/index.js";
import { proxy as tcpProxy } from "../testing/proxy.mjs";

const broker = new URL(process.env.BROKER_URL ?? "mqtt://127.0.0.1:1883");
const WAIT = 10_000;

async function start(uid, device, { url = broker.href, store = new MemoryStore() } = {}) {
  const client = await Client.start({ url, uid, deviceId: device, password: "pw", store, backoffMinMs: 50, backoffMaxMs: 400 });
  const seen = [];
  const waiters = new Set();
  client.on((event) => {
    seen.push(event);
    for (const waiter of waiters) waiter(event);
  });
  /** Resolves with the first event (seen from now on, or already) that `pick` accepts. */
  client.waitFor = (what, pick, { past = false } = {}) =>
    new Promise((resolve, reject) => {
      if (past) {
        const found = seen.find(pick);
        if (found) return resolve(found);
      }
      const timer = setTimeout(() => reject(new Error(`no event: ${what}`)), WAIT);
      const waiter = (event) => {
        if (!pick(event)) return;
        clearTimeout(timer);
        waiters.delete(waiter);
        resolve(event);
      };
      waiters.add(waiter);
    });
  client.seen = seen;
  return client;
}

const online = (event) => event.type === "connection" && event.state === "online";
const offline = (event) => event.type === "connection" && event.state === "offline";
const sent = (msgId) => (e) => e.type === "updated" && e.message.msgId === msgId && e.message.delivery.state === "sent";
const arrived = (text) => (e) => e.type === "message" && e.message.content.text === text;

async function texts(client, conversation) {
  return (await client.messages(conversation, undefined, 10_000)).reverse().map((m) => m.content.text);
}

async function eventually(condition) {
  const deadline = Date.now() + WAIT;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error("condition not reached");
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A proxy to the suite's broker, with a `url` for clients. */
async function proxy() {
  const link = await tcpProxy(broker.port, broker.hostname);
  return Object.assign(link, { url: `mqtt://127.0.0.1:${link.port}` });
}

/** Runs the mqtt-im binary on `dir` (its SQLite store survives a restart); resolves once it listens. */
function spawnBroker(dir) {
  const binary = process.env.MQTT_IM_BIN;
  if (!binary) throw new Error("MQTT_IM_BIN does not name the mqtt-im binary");
  const env = { ...process.env, MQTT_IM__LISTENERS__MQTT: "127.0.0.1:0", MQTT_IM__STORE__PATH: join(dir, "im.db"), MQTT_IM__AUTH__PLAINTEXT: "true" };
  delete env.RUST_LOG;
  for (const uid of ["T21", "T22"]) env[`MQTT_IM__AUTH__USERS__${uid}`] = "pw";
  const child = spawn(binary, [], { env, stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("mqtt-im did not start")), WAIT);
    const lines = createInterface({ input: child.stdout });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const port = /^mqtt-im listening on 127\.0\.0\.1:(\d+)$/.exec(line)?.[1];
      if (!port) return reject(new Error(`unexpected first line ${JSON.stringify(line)}`));
      lines.on("line", () => undefined); // drained for as long as it lives
      resolve({ port, exited: new Promise((done) => child.once("exit", done)), kill: () => child.kill("SIGKILL") });
    });
    child.once("error", reject);
  });
}

test("a send is echoed at once, sent with its seq, received live, unread, then read", async () => {
  const alice = await start("t1", "t1-web");
  const bob = await start("t2", "t2-web");
  await alice.waitFor("online", online, { past: true });
  await bob.waitFor("online", online, { past: true });
  const echo = await alice.sendText("u/t2", "hello");
  assert.equal(echo.delivery.state, "sending");
  assert.deepEqual(await texts(alice, "u/t2"), ["hello"]);
  const done = await alice.waitFor("sent", sent(echo.msgId), { past: true });
  assert.equal(done.message.seq, 1);
  const got = await bob.waitFor("live", arrived("hello"), { past: true });
  assert.equal(got.message.from, "t1");
  const badge = await bob.waitFor("unread", (e) => e.type === "unread" && e.conversation === "u/t1", { past: true });
  assert.equal(badge.unread, 1);
  assert.equal((await bob.conversation("u/t1")).unread, 1);
  assert.equal((await alice.conversation("u/t2")).unread, 0);
  await bob.markRead("u/t1", 1);
  assert.equal((await bob.unread()).total, 0);
  const read = await alice.waitFor("read", (e) => e.type === "read" && e.uid === "t2");
  assert.equal(read.readSeq, 1);
  await Promise.all([alice.close(), bob.close()]);
});

test("a lost answer and a dropped network still deliver each message once", async () => {
  const link = await proxy();
  const alice = await start("t3", "t3-web", { url: link.url });
  const bob = await start("t4", "t4-web");
  await alice.waitFor("online", online, { past: true });
  await bob.waitFor("online", online, { past: true });
  link.set("mute");
  const first = await alice.sendText("u/t4", "answer lost");
  await bob.waitFor("stored", arrived("answer lost"), { past: true });
  link.set("down");
  await alice.waitFor("offline", offline, { past: true });
  const second = await alice.sendText("u/t4", "network down");
  link.set("up");
  await alice.waitFor("first sent", sent(first.msgId), { past: true });
  await alice.waitFor("second sent", sent(second.msgId), { past: true });
  await bob.waitFor("second", arrived("network down"), { past: true });
  const mine = await alice.messages("u/t4");
  assert.deepEqual(mine.map((m) => [m.content.text, m.seq]), [["network down", 2], ["answer lost", 1]]);
  assert.deepEqual(await texts(bob, "u/t3"), ["answer lost", "network down"]);
  await Promise.all([alice.close(), bob.close()]);
  link.close();
});

test("a hole left by a reconnect is filled from History; paging acknowledges", async () => {
  const link = await proxy();
  const alice = await start("t5", "t5-web");
  const bob = await start("t6", "t6-web", { url: link.url });
  await bob.waitFor("online", online, { past: true });
  for (const n of [1, 2, 3]) await alice.waitFor("sent", sent((await alice.sendText("u/t6", `m${n}`)).msgId), { past: true });
  await bob.waitFor("m3", arrived("m3"), { past: true });
  link.set("down");
  await bob.waitFor("offline", offline, { past: true });
  for (const n of [4, 5, 6, 7, 8, 9, 10]) await alice.waitFor("sent", sent((await alice.sendText("u/t6", `m${n}`)).msgId), { past: true });
  link.set("up");
  const expected = Array.from({ length: 10 }, (_, i) => `m${i + 1}`);
  await eventually(async () => JSON.stringify(await texts(bob, "u/t5")) === JSON.stringify(expected));
  // Paging to the end leaves nothing unacknowledged and shows nothing twice.
  while (!(await bob.fetchOlder("u/t5", 4)).end);
  assert.deepEqual(await texts(bob, "u/t5"), expected);
  assert.equal(bob.seen.filter((e) => e.type === "message").length, 10);
  await Promise.all([alice.close(), bob.close()]);
  link.close();
});

test("an offline device catches up to exact badges from the digest alone", async () => {
  const senders = ["t7", "t8", "t9"];
  for (const [i, uid] of senders.entries()) {
    const sender = await start(uid, `${uid}-web`);
    for (let n = 0; n <= i; n++) await sender.waitFor("sent", sent((await sender.sendText("u/t10", `${uid}-${n}`)).msgId), { past: true });
    await sender.close();
  }
  const bob = await start("t10", "t10-web");
  await bob.waitFor("online", online, { past: true });
  const unread = await bob.unread();
  assert.equal(unread.total, 6);
  assert.deepEqual(Object.fromEntries(unread.conversations), { "u/t7": 1, "u/t8": 2, "u/t9": 3 });
  assert.ok((await bob.messages("u/t9")).length < 3, "only previews came");
  await bob.close();
});

/** `each` chat messages from `sender` (a plain MQTT.js client, publishes pipelined) to `to`. */
async function flood(sender, to, each) {
  const client = await mqtt.connectAsync(broker.href, { clientId: `${sender}-flood`, username: sender, password: "pw", protocolVersion: 5 });
  const publishes = Array.from({ length: each }, (_, n) => {
    const envelope = pb.Envelope.encode({
      cmd: pb.Cmd.CMD_CHAT,
      chat: { v: 1, msgId: `${sender}-${n}`, to, chatType: pb.ChatType.CHAT_TYPE_SINGLE, msg: { text: `${sender} ${n}` } },
    }).finish();
    return client.publishAsync(`im/u/${to}`, Buffer.from(envelope), { qos: 1 });
  });
  await Promise.all(publishes);
  await client.endAsync();
}

test("a device away for 10,000 messages in 100 conversations catches up to exact badges", async () => {
  const store = new MemoryStore();
  const before = await start("t15", "t15-web", { store });
  await before.waitFor("online", online, { past: true });
  await before.close();
  const senders = Array.from({ length: 100 }, (_, n) => `s${n + 1}`);
  await Promise.all(senders.map((sender) => flood(sender, "t15", 100)));
  const bob = await start("t15", "t15-web", { store });
  await bob.waitFor("online", online, { past: true });
  const unread = await bob.unread();
  assert.equal(unread.total, 10_000);
  assert.equal(unread.conversations.length, 100);
  assert.ok(unread.conversations.every(([, count]) => count === 100), JSON.stringify(unread.conversations));
  assert.equal((await bob.messages("u/s1")).length, 1, "only the digest's preview came");
  await bob.close();
});

test("two devices of one user hold the same messages and read state", async () => {
  const alice = await start("t11", "t11-web");
  const phone = await start("t12", "t12-phone");
  const laptopStore = new MemoryStore();
  let laptop = await start("t12", "t12-laptop", { store: laptopStore });
  await Promise.all([alice, phone, laptop].map((c) => c.waitFor("online", online, { past: true })));
  await alice.sendText("u/t12", "a1");
  await phone.waitFor("a1", arrived("a1"), { past: true });
  await laptop.waitFor("a1", arrived("a1"), { past: true });
  const reply = await phone.sendText("u/t11", "p1");
  await phone.waitFor("sent", sent(reply.msgId), { past: true });
  await phone.markRead("u/t11", 1);
  while (!(await laptop.fetchOlder("u/t11")).end);
  assert.deepEqual(await texts(laptop, "u/t11"), ["a1", "p1"]);
  await laptop.close();
  laptop = await start("t12", "t12-laptop", { store: laptopStore });
  await laptop.waitFor("online", online, { past: true });
  assert.equal((await laptop.conversation("u/t11")).unread, 0);
  await Promise.all([alice.close(), phone.close(), laptop.close()]);
});

test("the outbox survives a restart of the app (IndexedDB) and is sent once", async () => {
  const link = await proxy();
  link.set("down");
  const store = await IndexedDbStore.open("t13-web");
  const first = await start("t13", "t13-web", { url: link.url, store });
  const message = await first.sendText("u/t14", "written offline");
  await first.close();
  link.set("up");
  const again = await start("t13", "t13-web", { url: link.url, store: await IndexedDbStore.open("t13-web") });
  await eventually(async () => (await again.messages("u/t14")).some((m) => m.msgId === message.msgId && m.delivery.state === "sent"));
  const bob = await start("t14", "t14-web");
  await bob.waitFor("online", online, { past: true });
  while (!(await bob.fetchOlder("u/t13")).end);
  assert.deepEqual(await texts(bob, "u/t13"), ["written offline"]);
  await Promise.all([again.close(), bob.close()]);
  link.close();
});

test("a send through a broker SIGKILL and an app restart is delivered exactly once", async () => {
  const dir = await mkdtemp(join(tmpdir(), "mqtt-im-sigkill-"));
  let node = await spawnBroker(dir);
  const link = await tcpProxy(node.port);
  const url = `mqtt://127.0.0.1:${link.port}`;
  const alice = await start("t21", "t21-web", { url, store: await IndexedDbStore.open("t21-web") });
  await alice.waitFor("online", online, { past: true });
  const first = await alice.sendText("u/t22", "before the kill");
  node.kill();
  await node.exited;
  await alice.waitFor("offline", offline, { past: true });
  const second = await alice.sendText("u/t22", "while it is down");
  // The app's process ends too; it starts again on the same IndexedDB database.
  await alice.close();
  node = await spawnBroker(dir);
  link.retarget(node.port);
  try {
    const again = await start("t21", "t21-web", { url, store: await IndexedDbStore.open("t21-web") });
    await eventually(async () => {
      const held = await again.messages("u/t22");
      return held.length === 2 && held.every((m) => m.delivery.state === "sent");
    });
    const mine = await again.messages("u/t22");
    assert.deepEqual(mine.map((m) => [m.msgId, m.seq]), [[second.msgId, 2], [first.msgId, 1]], "sent in order, each once");
    const bob = await start("t22", "t22-web", { url: `mqtt://127.0.0.1:${node.port}` });
    await bob.waitFor("online", online, { past: true });
    while (!(await bob.fetchOlder("u/t21")).end);
    assert.deepEqual(await texts(bob, "u/t21"), ["before the kill", "while it is down"]);
    await Promise.all([again.close(), bob.close()]);
  } finally {
    node.kill();
    link.close();
    await rm(dir, { recursive: true, force: true });
  }
});
