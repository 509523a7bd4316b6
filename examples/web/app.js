// mqtt-im in a browser: MQTT over WebSocket (mqtt.js) with the protobuf wire types
// (protobufjs, loading proto/mqtt_im/v1/im.proto). Logs in, shows the conversation list with
// unread badges from the digest, pages a conversation's backlog with Pull (each Pull
// acknowledging the page before it), and sends messages.
"use strict";

const params = new URLSearchParams(location.search);
const PAGE_SIZE = Number(params.get("page")) || 20;
const $ = (id) => document.getElementById(id);

const state = {
  client: null,
  uid: "",
  types: null,
  nextRequest: 1,
  pending: new Map(), // request_id -> resolve
  conversations: new Map(), // "u/peer" -> { unacked, preview }
  open: null, // { name, cursor, end }
};

if (params.get("broker")) $("broker").value = params.get("broker");

async function loadTypes() {
  const root = await protobuf.load("vendor/im.proto");
  const type = (name) => root.lookupType(`mqtt_im.v1.${name}`);
  return {
    Envelope: type("Envelope"),
    Request: type("Request"),
    Response: type("Response"),
    Digest: type("Digest"),
    CMD_CHAT: root.lookupEnum("mqtt_im.v1.Cmd").values.CMD_CHAT,
  };
}

function decode(type, bytes) {
  return type.toObject(type.decode(bytes), { longs: Number, defaults: true, oneofs: true });
}

function showError(text) {
  $("error").textContent = text;
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  state.types = state.types || (await loadTypes());
  state.uid = $("user").value.trim();
  const client = mqtt.connect($("broker").value, {
    username: state.uid,
    password: $("password").value,
    clientId: `web-${state.uid}-${Math.random().toString(16).slice(2, 10)}`,
    protocolVersion: 4,
    reconnectPeriod: 0,
  });
  state.client = client;
  client.on("connect", () => {
    $("login-form").hidden = true;
    $("chat").hidden = false;
    $("me").textContent = state.uid;
    $("status").textContent = "online";
    client.subscribe(`im/u/${state.uid}/#`, { qos: 1 });
  });
  client.on("message", (topic, payload) => onMessage(topic, payload));
  client.on("error", (error) => showError(`MQTT: ${error.message}`));
  client.on("close", () => ($("status").textContent = "offline"));
});

function onMessage(topic, payload) {
  const base = `im/u/${state.uid}`;
  if (topic === `${base}/digest`) return onDigest(decode(state.types.Digest, payload));
  if (topic === `${base}/resp`) return onResponse(decode(state.types.Response, payload));
  if (topic === base) return onLive(decode(state.types.Envelope, payload).chat);
}

// One digest per connection: badges and previews, then the counters it carried are cleared.
function onDigest(digest) {
  for (const [name, session] of Object.entries(digest.sessions)) {
    const preview = session.lastMsgs.length ? textOf(session.lastMsgs[0]) : "";
    state.conversations.set(name, { unacked: session.unacked, preview });
  }
  renderConversations();
  request({ clearCounters: { version: digest.version } });
}

function onResponse(response) {
  const resolve = state.pending.get(response.requestId);
  if (resolve) {
    state.pending.delete(response.requestId);
    return resolve(response);
  }
  if (response.sendResult) markSent(response.sendResult);
}

// A live message: shown if its conversation is open (and marked read), else counted.
function onLive(chat) {
  const name = `u/${chat.from}`;
  const entry = conversation(name);
  entry.preview = textOf(chat);
  if (state.open && state.open.name === name) {
    appendMessage(chat, false);
    request({ markRead: { conversation: name, seq: chat.seq } });
  } else {
    entry.unacked += 1;
  }
  renderConversations();
}

function request(kind) {
  const requestId = `r${state.nextRequest++}`;
  const message = state.types.Request.fromObject({ requestId, ...kind });
  const bytes = state.types.Request.encode(message).finish();
  return new Promise((resolve) => {
    state.pending.set(requestId, resolve);
    state.client.publish(`im/u/${state.uid}/req`, bytes, { qos: 1 });
  });
}

function conversation(name) {
  if (!state.conversations.has(name)) state.conversations.set(name, { unacked: 0, preview: "" });
  return state.conversations.get(name);
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const [name, entry] of state.conversations) {
    const item = document.createElement("li");
    item.dataset.conversation = name;
    item.classList.toggle("open", state.open?.name === name);
    const label = document.createElement("span");
    label.textContent = name.slice(2);
    const preview = document.createElement("span");
    preview.className = "preview";
    preview.textContent = entry.preview;
    label.append(preview);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = entry.unacked > 0 ? String(entry.unacked) : "";
    item.append(label, badge);
    item.addEventListener("click", () => openConversation(name));
    list.append(item);
  }
}

async function openConversation(name) {
  state.open = { name, cursor: null, end: false, newest: 0 };
  conversation(name);
  $("title").textContent = name.slice(2);
  $("messages").replaceChildren();
  $("send-form").hidden = false;
  renderConversations();
  await pullPage();
}

// The newest page not acknowledged yet; its Pull acknowledges the page shown before it.
async function pullPage() {
  const open = state.open;
  const ack = open.cursor || undefined;
  const response = await request({
    pull: { conversation: open.name, pageSize: PAGE_SIZE, ack },
  });
  if (response.error) return showError(response.error.message);
  const page = response.page;
  for (const chat of page.messages) prependMessage(chat);
  const entry = conversation(open.name);
  entry.unacked = Math.max(0, entry.unacked - page.messages.length);
  open.cursor = page.cursor;
  open.end = page.end;
  const newest = page.messages.length ? page.messages[0].seq : 0;
  if (newest > open.newest) {
    open.newest = newest;
    request({ markRead: { conversation: open.name, seq: newest } });
  }
  if (open.end && open.cursor) {
    // The last page has no Pull after it to acknowledge it.
    request({ ack: { conversation: open.name, upTo: open.cursor.toSeq } });
  }
  $("older").hidden = open.end;
  renderConversations();
}

$("older").addEventListener("click", () => pullPage());

$("new-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const peer = $("new-peer").value.trim();
  if (peer) openConversation(`u/${peer}`);
  $("new-peer").value = "";
});

$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text || !state.open) return;
  const peer = state.open.name.slice(2);
  const chat = {
    msgId: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`,
    to: peer,
    ackFlg: true,
    time: Date.now(),
    msg: { text },
  };
  const envelope = state.types.Envelope.fromObject({ cmd: state.types.CMD_CHAT, time: chat.time, chat });
  const bytes = state.types.Envelope.encode(envelope).finish();
  appendMessage({ ...chat, from: state.uid, seq: 0 }, true);
  state.client.publish(`im/u/${peer}`, bytes, { qos: 1 }, (error) => {
    if (error) showError(`not sent: ${error.message}`);
  });
  conversation(state.open.name).preview = text;
  $("text").value = "";
  renderConversations();
});

function markSent(result) {
  const item = document.querySelector(`[data-msg-id="${CSS.escape(result.msgId)}"]`);
  if (!item) return;
  item.classList.add("sent");
  item.querySelector(".meta").textContent = `✓ #${result.seq}`;
}

function textOf(chat) {
  return chat.msg?.text ?? (chat.msg?.media ? "[media]" : "");
}

function messageItem(chat, pending) {
  const item = document.createElement("li");
  item.className = "message";
  item.classList.toggle("mine", chat.from === state.uid);
  item.dataset.msgId = chat.msgId;
  item.dataset.seq = String(chat.seq);
  const text = document.createElement("div");
  text.textContent = textOf(chat);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = pending ? "sending…" : `${chat.from} #${chat.seq}`;
  item.append(text, meta);
  return item;
}

function prependMessage(chat) {
  $("messages").prepend(messageItem(chat, false));
}

function appendMessage(chat, pending) {
  const list = $("messages");
  list.append(messageItem(chat, pending));
  list.scrollTop = list.scrollHeight;
}
