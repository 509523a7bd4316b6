// mqtt-im in a browser, on the TypeScript SDK (@mqtt-im/client, vendored as a bundle by
// scripts/web.sh). The SDK keeps the local store (IndexedDB), the outbox and the sync; this
// page only draws what it holds and forwards the person's clicks.
import { Client, IndexedDbStore } from "./vendor/mqtt-im-client.js";

const params = new URLSearchParams(location.search);
const PAGE_SIZE = Number(params.get("page")) || 20;
const $ = (id) => document.getElementById(id);

let client = null;
// The conversation on screen: how many of its messages are shown, whether the server has
// older ones, and the newest seq drawn.
let open = null;
// Conversations whose read cursor is being moved (one request at a time each).
const marking = new Set();

if (params.get("broker")) $("broker").value = params.get("broker");

/** One stable MQTT client id per user in this browser: the server keeps offline state per device. */
function deviceId(uid) {
  const key = `mqtt-im-device/${uid}`;
  let id = localStorage.getItem(key);
  if (!id) {
    id = `web-${uid}-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(key, id);
  }
  return id;
}

function showError(text) {
  $("error").textContent = text;
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  const uid = $("user").value.trim();
  try {
    $("login").disabled = true;
    client = await Client.start({
      url: $("broker").value,
      uid,
      deviceId: deviceId(uid),
      password: $("password").value,
      store: await IndexedDbStore.open(`mqtt-im/${uid}`),
      pageSize: PAGE_SIZE,
    });
  } catch (error) {
    $("login").disabled = false;
    return showError(error.message);
  }
  client.on(onEvent);
  $("login-form").hidden = true;
  $("chat").hidden = false;
  $("me").textContent = uid;
  redraw();
});

function onEvent(event) {
  if (event.type === "connection") $("status").textContent = event.state;
  // A message newer than the screen's (a local echo, a live one) is shown in addition.
  if (event.type === "message" && event.message.conversation === open?.id && !(event.message.seq <= open.newest)) open.limit++;
  if (event.type === "missed" || event.type === "gone") {
    showError(`${event.count} message(s) in ${event.conversation} ${event.type === "gone" ? "expired" : "were dropped"} before you fetched them`);
  }
  redraw();
}

// Events come in bursts (a digest, a page): draw once per frame.
let drawing = null;
function redraw() {
  drawing ??= requestAnimationFrame(async () => {
    drawing = null;
    try {
      await drawConversations();
      if (open) await drawMessages();
    } catch (error) {
      showError(error.message);
    }
  });
}

async function drawConversations() {
  const list = $("conversations");
  const items = [];
  for (const conversation of await client.conversations()) {
    const item = document.createElement("li");
    item.dataset.conversation = conversation.id;
    item.classList.toggle("open", conversation.id === open?.id);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = conversation.id.slice(2);
    const preview = document.createElement("span");
    preview.className = "preview";
    preview.textContent = conversation.lastMessage?.content.text ?? "";
    name.append(preview);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = conversation.unread > 0 ? String(conversation.unread) : "";
    item.append(name, badge);
    item.addEventListener("click", () => openConversation(conversation.id));
    items.push(item);
  }
  list.replaceChildren(...items);
}

async function openConversation(id) {
  open = { id, limit: PAGE_SIZE, end: false, newest: 0 };
  $("title").textContent = id.slice(2);
  $("send-form").hidden = false;
  // A conversation with less than a page held locally gets its newest page at once.
  if ((await client.messages(id, undefined, PAGE_SIZE)).length < PAGE_SIZE) await loadOlder(false);
  redraw();
}

async function loadOlder(more = true) {
  const id = open.id;
  try {
    // Pages of messages already held (digest previews, live ones) are taken to acknowledge
    // them and are not a step back for the person: fetch until something older comes.
    let page;
    do page = await client.fetchOlder(id, PAGE_SIZE);
    while (!page.end && page.added === 0 && open?.id === id);
    if (open?.id !== id) return;
    open.end = page.end;
    if (more) open.limit += PAGE_SIZE;
  } catch (error) {
    showError(error.message);
  }
  redraw();
}

/** What a person sees of an own message's delivery: a label and a class to style it. */
function deliveryOf(message, readers) {
  const delivery = message.delivery;
  switch (delivery.state) {
    case "sending":
      return delivery.error ? ["retrying", `retrying: ${delivery.error}`] : ["sending", "sending…"];
    case "failed":
      return ["failed", `failed: ${delivery.reason}`];
    default: {
      const read = readers.filter(([uid, seq]) => uid !== client.uid && seq >= message.seq).length;
      if (read === 0) return ["sent", "sent ✓"];
      return ["read", open.id.startsWith("g/") ? `read by ${read} ✓✓` : "read ✓✓"];
    }
  }
}

async function drawMessages() {
  const { id } = open;
  const conversation = await client.conversation(id);
  // One more than shown says whether older messages are held locally.
  const held = await client.messages(id, undefined, open.limit + 1);
  const shown = held.slice(0, open.limit).reverse();
  open.newest = Math.max(open.newest, ...shown.map((m) => m.seq ?? 0));
  const readers = await client.readers(id);
  if (conversation && !id.startsWith("g/")) readers.push([id.slice(2), conversation.peerReadSeq]);
  if (open?.id !== id) return;
  const items = shown.map((message) => {
    const item = document.createElement("li");
    item.className = "message";
    item.dataset.msgId = message.msgId;
    if (message.seq) item.dataset.seq = String(message.seq);
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = message.content.text ?? `[${message.content.media?.mime ?? "media"}]`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const when = new Date(message.serverTime || message.time).toLocaleTimeString();
    meta.textContent = `${message.from} · ${when}`;
    if (message.from === client.uid) {
      const [state, label] = deliveryOf(message, readers);
      item.classList.add("mine", state);
      const status = document.createElement("span");
      status.className = "state";
      status.textContent = ` · ${label}`;
      meta.append(status);
    }
    item.append(text, meta);
    return item;
  });
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
  $("older").hidden = open.end && held.length <= open.limit;
  // What is on screen is read.
  if (conversation && conversation.unread > 0 && document.visibilityState === "visible" && !marking.has(id)) {
    marking.add(id);
    client
      .markRead(id, conversation.maxSeq)
      .catch((error) => showError(error.message))
      .finally(() => marking.delete(id));
  }
}

$("older").addEventListener("click", () => loadOlder());

$("new-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const peer = $("new-peer").value.trim();
  if (!/^[A-Za-z0-9_.@-]{1,64}$/.test(peer)) return showError(`${JSON.stringify(peer)} is not a user id`);
  $("new-peer").value = "";
  openConversation(`u/${peer}`);
});

$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text || !open) return;
  $("text").value = "";
  // Shown at once (local echo); the SDK sends it, resends it after a reconnect or a reload,
  // and reports each change of its state.
  client.sendText(open.id, text).catch((error) => showError(error.message));
});

document.addEventListener("visibilitychange", redraw);
