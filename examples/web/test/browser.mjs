// Drives the web demo in headless Chromium (Debian's package, through playwright-core) and
// checks what a person sees: the login form gone after login, the unread badge from the
// digest, the backlog paged with pull-and-ack, each own message's state (sending while the
// network is down, sent, read once the peer reads, failed when refused, retrying when over
// the publish rate). The peer is a Node app on the same SDK. Run by tests/mqtt/web.rs, which
// starts the broker and checks the result over MQTT; saves a screenshot.
//
// Environment: BROKER_WS (host:port of the WebSocket listener, path /mqtt), BROKER_TCP
// (host:port), USER_NAME, PASSWORD, PEER and PEER_PASSWORD (who sent the unread messages),
// UNREAD (its expected badge), SEND_TEXT, TOO_LONG (a length the broker refuses), BURST (how
// many messages to send at once, more than the publish rate lets through), SCREENSHOT (file).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Client, MemoryStore } from "../../../clients/typescript/dist/index.js";
import { proxy } from "../../../clients/typescript/testing/proxy.mjs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const root = fileURLToPath(new URL("..", import.meta.url));
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

// The page's own files, as `scripts/web.sh` serves them.
const server = createServer(async (request, response) => {
  const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
  const file = join(root, path === "/" ? "index.html" : path);
  try {
    if (!file.startsWith(root)) throw new Error("outside");
    const body = await readFile(file);
    response.writeHead(200, { "Content-Type": types[extname(file)] || "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
// The page reaches the broker through a proxy that can drop its network.
const [wsHost, wsPort] = env("BROKER_WS").split(":");
const link = await proxy(wsPort, wsHost);
const broker = `ws://127.0.0.1:${link.port}/mqtt`;
const url = `http://127.0.0.1:${server.address().port}/?page=2&broker=${encodeURIComponent(broker)}`;

const peerId = env("PEER");
const peer = await Client.start({
  url: `mqtt://${env("BROKER_TCP")}`,
  uid: peerId,
  deviceId: `${peerId}-node`,
  password: env("PEER_PASSWORD"),
  store: new MemoryStore(),
});

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 900, height: 600 } });
const failures = [];
page.on("pageerror", (error) => failures.push(`page error: ${error.message}`));
page.on("console", (message) => message.type() === "error" && failures.push(`console: ${message.text()}`));

const step = async (what, action) => {
  try {
    await action();
    console.log(`ok: ${what}`);
  } catch (error) {
    await page.screenshot({ path: env("SCREENSHOT") }).catch(() => {});
    throw new Error(`${what}: ${error.message}\n${failures.join("\n")}`);
  }
};
const timeout = { timeout: 10000 };
const row = page.locator(`li[data-conversation="u/${peerId}"]`);
const messages = page.locator("#messages .message");
const mine = (text) => page.locator("#messages .message.mine").filter({ has: page.getByText(text, { exact: true }) });
/** Waits until `locator` is visible with exactly `text`. */
const shows = async (locator, text) => {
  await locator.waitFor({ state: "visible", ...timeout });
  const deadline = Date.now() + timeout.timeout;
  while ((await locator.innerText()).trim() !== text) {
    if (Date.now() > deadline) throw new Error(`shows ${JSON.stringify(await locator.innerText())}, not ${JSON.stringify(text)}`);
    await page.waitForTimeout(20);
  }
};
/** Resolves with the first truthy result of `probe`, tried until the timeout. */
const until = async (probe) => {
  const deadline = Date.now() + timeout.timeout;
  for (;;) {
    const found = await probe();
    if (found) return found;
    if (Date.now() > deadline) throw new Error("not reached in time");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
};
const stateOf = (text) => mine(text).locator(".state");
const send = async (text) => {
  await page.fill("#text", text);
  await page.click("#send");
};

try {
  await step("page loads", () => page.goto(url));
  await step("log in: the form goes, the chat shows, online", async () => {
    await page.fill("#user", env("USER_NAME"));
    await page.fill("#password", env("PASSWORD"));
    await page.click("#login");
    await page.locator("#chat").waitFor({ state: "visible", ...timeout });
    await page.locator("#login-form").waitFor({ state: "hidden", ...timeout });
    await shows(page.locator("#me"), env("USER_NAME"));
    await shows(page.locator("#status"), "online");
  });
  await step(`badge shows ${env("UNREAD")} unread`, async () => {
    await shows(row.locator(".badge"), env("UNREAD"));
    await shows(row.locator(".preview"), `message ${env("UNREAD")}`);
  });
  await step("open the conversation: the newest page, read", async () => {
    await row.click();
    await page.waitForFunction(() => document.querySelectorAll("#messages .message").length === 2, null, timeout);
    await page.locator("#older").waitFor({ state: "visible", ...timeout });
    await row.locator(".badge").waitFor({ state: "hidden", ...timeout });
  });
  await step("pull the older page (acknowledging the first)", async () => {
    await page.click("#older");
    const unread = Number(env("UNREAD"));
    await page.waitForFunction((n) => document.querySelectorAll("#messages .message").length === n, unread, timeout);
    await page.locator("#older").waitFor({ state: "hidden", ...timeout });
    const seqs = await messages.evaluateAll((items) => items.map((item) => item.dataset.seq));
    const expected = Array.from({ length: unread }, (_, i) => String(i + 1));
    if (seqs.join() !== expected.join()) throw new Error(`seqs ${seqs} are not ${expected}`);
  });
  await step("send a message: sent", async () => {
    await send(env("SEND_TEXT"));
    await shows(stateOf(env("SEND_TEXT")), "· sent ✓");
  });
  await step("the peer reads it: read", async () => {
    const got = await until(async () => (await peer.messages(`u/${env("USER_NAME")}`)).find((m) => m.content.text === env("SEND_TEXT")));
    await peer.markRead(`u/${env("USER_NAME")}`, got.seq);
    await shows(stateOf(env("SEND_TEXT")), "· read ✓✓");
  });
  await step("sent while the network is down: sending, then sent", async () => {
    link.set("down");
    await shows(page.locator("#status"), "offline");
    await send("written offline");
    await shows(stateOf("written offline"), "· sending…");
    link.set("up");
    await shows(page.locator("#status"), "online");
    await shows(stateOf("written offline"), "· sent ✓");
  });
  await step("refused as too large: failed", async () => {
    await send("x".repeat(Number(env("TOO_LONG"))));
    const failed = page.locator("#messages .message.mine.failed .state");
    await failed.waitFor({ state: "visible", ...timeout });
    const label = (await failed.innerText()).trim();
    if (!label.startsWith("· failed: ")) throw new Error(`the failed message shows ${JSON.stringify(label)}`);
  });
  const burst = Array.from({ length: Number(env("BURST")) }, (_, i) => `burst ${i + 1}`);
  await step(`${burst.length} at once, over the publish rate: retrying, then all sent`, async () => {
    for (const text of burst) await send(text);
    const retrying = page.locator("#messages .message.mine.retrying .state").first();
    await retrying.waitFor({ state: "visible", ...timeout });
    const label = (await retrying.innerText()).trim();
    if (label !== "· retrying: message rate too high") throw new Error(`a retried message shows ${JSON.stringify(label)}`);
    await shows(stateOf(burst.at(-1)), "· sent ✓");
    await page.locator("#messages .message.sending, #messages .message.retrying").first().waitFor({ state: "detached", ...timeout });
  });
  await step("the peer has every message once, in order", async () => {
    const expected = [
      ...Array.from({ length: Number(env("UNREAD")) }, (_, i) => `message ${i + 1}`),
      env("SEND_TEXT"), "written offline", ...burst,
    ];
    let held = [];
    const complete = async () => {
      while (!(await peer.fetchOlder(`u/${env("USER_NAME")}`)).end);
      held = (await peer.messages(`u/${env("USER_NAME")}`, undefined, 1000)).reverse().map((m) => m.content.text);
      return held.join("\n") === expected.join("\n");
    };
    await until(complete).catch(() => {
      throw new Error(`the peer holds ${JSON.stringify(held)}`);
    });
  });
  await step("the layout holds: list, messages and the send button on screen", async () => {
    const width = page.viewportSize().width;
    for (const selector of [`li[data-conversation="u/${peerId}"]`, "#messages", "#send"]) {
      const box = await page.locator(selector).boundingBox();
      if (!box || box.x < 0 || box.x + box.width > width) throw new Error(`${selector} is off screen: ${JSON.stringify(box)}`);
    }
  });
  await page.screenshot({ path: env("SCREENSHOT") });
  if (failures.length) throw new Error(failures.join("\n"));
} finally {
  await browser.close();
  await peer.close();
  link.close();
  server.close();
}
