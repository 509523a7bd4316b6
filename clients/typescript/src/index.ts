// @mqtt-im/client: the app's half of the mqtt-im protocol over MQTT 5 (MQTT.js), with a
// local store. Every incoming packet and every app call is applied one at a time, in the
// order it arrived, on one promise chain.
import { Buffer } from "buffer";
import mqtt, { type IClientOptions, type MqttClient } from "mqtt";
import { mqtt_im } from "./gen/im.js";
import { hold, holes, newRecord, type ConversationRecord, type Content, type LocalStore, type Message, type OutboxItem, type SeqRange } from "./store.js";

export * from "./store.js";
export const pb = mqtt_im.v1;

export type ConnectionState = "connecting" | "online" | "offline";

export type ClientEvent =
  | { type: "message"; message: Message }
  | { type: "updated"; message: Message }
  | { type: "unread"; conversation: string; unread: number }
  | { type: "read"; conversation: string; uid: string; readSeq: number }
  | { type: "missed" | "gone"; conversation: string; count: number }
  | { type: "connection"; state: ConnectionState; reason?: string };

export interface ClientOptions {
  /** `mqtt://host:port`, `ws://host:port/mqtt`, `wss://…` (browsers: ws or wss). */
  url: string;
  uid: string;
  /** The MQTT client id: offline state is kept per device, so keep it stable. */
  deviceId: string;
  username?: string;
  /** A password or a token (JWT). */
  password?: string;
  store: LocalStore;
  prefix?: string;
  pageSize?: number;
  requestTimeoutMs?: number;
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** Extra MQTT.js options (TLS certificates in Node, for example). */
  mqtt?: IClientOptions;
}

export interface Conversation {
  id: string;
  unread: number;
  maxSeq: number;
  readSeq: number;
  peerReadSeq: number;
  lastTime: number;
  missed: number;
  gone: number;
  lastMessage?: Message;
}

/** A refusal or failure of a request, with the protocol's error code. */
export class ClientError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

type PageKind = "pull" | "hole" | "history";
interface Pending {
  resolve: (response: mqtt_im.v1.Response) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

const HOLE_PAGE = 100;

/** Why the broker did not take a publish: its PUBACK reason code (0: the link dropped) and words. */
interface Refusal {
  code: number;
  reason: string;
}

function refusalOf(error: Error | undefined, packet: unknown): Refusal {
  const code = (error as (Error & { code?: number }) | undefined)?.code ?? 0;
  // The server's reason string says more than MQTT.js's name for the code.
  const said = (packet as { properties?: { reasonString?: string } } | undefined)?.properties?.reasonString;
  return { code, reason: said || (error?.message ?? "").replace(/^Publish error: /, "") };
}
const randomId = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

export class Client {
  readonly uid: string;
  private mqtt!: MqttClient;
  private chain: Promise<unknown> = Promise.resolve();
  private listeners = new Set<(event: ClientEvent) => void>();
  private requests = new Map<string, Pending>();
  private nextRequest = 0;
  private readonly run = randomId().slice(0, 8);
  private online = false;
  private closed = false;
  private failures = 0;
  private outbox: OutboxItem[] = [];
  private inFlight = new Map<string, string>();
  private retryAt = new Map<string, ReturnType<typeof setTimeout>>();
  private filling = new Set<string>();
  private groups = new Set<string>();
  private readonly prefix: string;
  private readonly inbox: string;

  private constructor(private readonly options: ClientOptions) {
    this.uid = options.uid;
    this.prefix = options.prefix ?? "im";
    this.inbox = `${this.prefix}/u/${this.uid}`;
  }

  /** Starts on `options.store`; connects (and reconnects with jittered backoff) in the background. */
  static async start(options: ClientOptions): Promise<Client> {
    if (!/^[A-Za-z0-9_.@-]{1,64}$/.test(options.uid)) throw new ClientError(`${JSON.stringify(options.uid)} is not an IM user id`, "OPTIONS");
    const client = new Client(options);
    await options.store.bindUser(options.uid);
    client.outbox = await options.store.outbox();
    for (const record of await options.store.conversations()) if (record.id.startsWith("g/")) client.groups.add(record.id.slice(2));
    client.connect();
    return client;
  }

  /** Subscribes to every event; returns the unsubscribe function. */
  on(listener: (event: ClientEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(event: ClientEvent) {
    for (const listener of this.listeners) listener(event);
  }

  /** Runs `work` after everything queued before it. */
  private serial<T>(work: () => Promise<T>): Promise<T> {
    const next = this.chain.then(work);
    this.chain = next.catch(() => undefined);
    return next;
  }

  private connect() {
    this.emit({ type: "connection", state: "connecting" });
    this.mqtt = mqtt.connect(this.options.url, {
      clientId: this.options.deviceId,
      username: this.options.username ?? this.uid,
      password: this.options.password,
      protocolVersion: 5,
      clean: true,
      reconnectPeriod: 0,
      properties: { maximumPacketSize: 4 * 1024 * 1024 },
      // A message is acknowledged only once it is in the local store.
      customHandleAcks: (topic, payload, _packet, done) => {
        this.serial(() => this.incoming(topic, payload)).then(
          () => done(0),
          () => done(0x80),
        );
      },
      ...this.options.mqtt,
    });
    this.mqtt.on("connect", () => this.serial(() => this.connected()));
    this.mqtt.on("close", () => this.serial(async () => this.disconnected("connection closed")));
    this.mqtt.on("error", (error) => this.serial(async () => this.disconnected(error.message)));
  }

  private disconnected(reason: string) {
    if (this.closed) return;
    this.online = false;
    this.inFlight.clear();
    this.filling.clear();
    for (const [id, pending] of this.requests) {
      clearTimeout(pending.timer);
      pending.reject(new ClientError("the connection dropped before the answer came", "DISCONNECTED"));
      this.requests.delete(id);
    }
    if (this.reconnecting) return;
    this.emit({ type: "connection", state: "offline", reason });
    this.failures++;
    const min = this.options.backoffMinMs ?? 200;
    const max = this.options.backoffMaxMs ?? 30_000;
    const ceiling = Math.min(max, min * 2 ** Math.min(this.failures, 16));
    this.reconnecting = setTimeout(() => {
      this.reconnecting = undefined;
      if (this.closed) return;
      this.emit({ type: "connection", state: "connecting" });
      this.mqtt.reconnect();
    }, ceiling / 2 + Math.random() * (ceiling / 2));
  }
  private reconnecting?: ReturnType<typeof setTimeout>;

  private async connected() {
    this.online = true;
    this.failures = 0;
    this.mqtt.subscribe(`${this.inbox}/#`, { qos: 1 });
    for (const gid of this.groups) this.mqtt.subscribe(`${this.prefix}/g/${gid}`, { qos: 1 });
    this.ask({ myGroups: {} }).then(
      (response) => this.serial(async () => {
        for (const gid of Object.keys(response.groups?.groups ?? {})) await this.joined(gid);
      }),
      () => undefined,
    );
    for (const conversation of new Set(this.outbox.map((i) => i.conversation))) await this.pump(conversation);
  }

  // ---- requests ------------------------------------------------------------------------

  /** Any request of the protocol; resolves with its Response (an error status rejects). */
  request(kind: mqtt_im.v1.IRequest): Promise<mqtt_im.v1.Response> {
    return this.ask(kind);
  }

  private ask(kind: mqtt_im.v1.IRequest): Promise<mqtt_im.v1.Response> {
    if (!this.online) return Promise.reject(new ClientError("not connected", "OFFLINE"));
    const requestId = `${this.run}-${++this.nextRequest}`;
    const payload = pb.Request.encode({ ...kind, requestId }).finish();
    return new Promise((resolve, reject) => {
      const timeout = this.options.requestTimeoutMs ?? 10_000;
      const timer = setTimeout(() => {
        this.requests.delete(requestId);
        reject(new ClientError(`no answer within ${timeout} ms`, "TIMEOUT"));
      }, timeout);
      // A request waiting for its answer does not keep a Node process alive.
      (timer as { unref?: () => void }).unref?.();
      this.requests.set(requestId, { resolve, reject, timer });
      this.mqtt.publish(`${this.inbox}/req`, Buffer.from(payload), { qos: 1 }, (error, packet) => {
        // A request the broker refused (over the publish rate, say) will get no answer.
        const refusal = refusalOf(error, packet);
        if (!refusal.code || !this.requests.delete(requestId)) return;
        clearTimeout(timer);
        reject(new ClientError(refusal.reason, "REFUSED"));
      });
    });
  }

  private answered(response: mqtt_im.v1.Response) {
    const pending = this.requests.get(response.requestId);
    if (!pending) return false;
    this.requests.delete(response.requestId);
    clearTimeout(pending.timer);
    if (response.status === pb.Status.STATUS_OK) pending.resolve(response);
    else {
      const code = pb.ErrorCode[response.error?.code ?? 0] ?? "ERROR_CODE_UNSPECIFIED";
      pending.reject(new ClientError(response.error?.message || code, code.replace("ERROR_CODE_", "")));
    }
    return true;
  }

  // ---- sending -------------------------------------------------------------------------

  /** Local echo + persisted outbox; sent and resent with the same msgId until stored. */
  sendText(conversation: string, text: string): Promise<Message> {
    if (!text) return Promise.reject(new ClientError("empty text", "INVALID"));
    return this.send(conversation, { text });
  }

  send(conversation: string, content: Content): Promise<Message> {
    return this.serial(async () => {
      const msgId = randomId();
      const time = Date.now();
      const group = conversation.startsWith("g/");
      const to = conversation.slice(2);
      const envelope = pb.Envelope.encode({
        cmd: pb.Cmd.CMD_CHAT,
        time,
        chat: {
          v: 1, msgId, ackFlg: true, to, time,
          chatType: group ? pb.ChatType.CHAT_TYPE_GROUP : pb.ChatType.CHAT_TYPE_SINGLE,
          msg: content.media ? { media: content.media } : { text: content.text ?? "" },
        },
      }).finish();
      const message: Message = { conversation, msgId, from: this.uid, time, content, delivery: { state: "sending", attempts: 0 } };
      const item: OutboxItem = { msgId, conversation, topic: `${this.prefix}/${group ? "g" : "u"}/${to}`, payload: envelope };
      const store = this.options.store;
      if (!(await store.conversation(conversation))) await store.insert(newRecord(conversation), []);
      await store.enqueue(message, item);
      this.outbox.push(item);
      this.emit({ type: "message", message });
      await this.pump(conversation);
      return message;
    });
  }

  /** Publishes the conversation's oldest outbox entry when nothing of it is on the wire. */
  private async pump(conversation: string) {
    if (!this.online || this.inFlight.has(conversation) || this.retryAt.has(conversation)) return;
    const item = this.outbox.find((i) => i.conversation === conversation);
    if (!item) return;
    this.inFlight.set(conversation, item.msgId);
    const message = await this.options.store.message(this.uid, item.msgId);
    let attempts = 1;
    if (message && message.delivery.state === "sending") {
      attempts = message.delivery.attempts + 1;
      message.delivery = { ...message.delivery, attempts };
      await this.options.store.update(message);
      if (attempts > 1) this.emit({ type: "updated", message });
    }
    this.mqtt.publish(item.topic, Buffer.from(item.payload), { qos: 1 }, (error, packet) => {
      if (error) this.serial(() => this.refused(item, refusalOf(error, packet), attempts));
    });
  }

  private async refused(item: OutboxItem, { code, reason }: Refusal, attempts: number) {
    if (this.inFlight.get(item.conversation) === item.msgId) this.inFlight.delete(item.conversation);
    const message = await this.options.store.message(this.uid, item.msgId);
    if (!message || message.delivery.state !== "sending") return;
    // No code: the connection dropped (resent at the next connect). 0x80: the store is
    // unavailable; 0x97 with "rate": too fast. Both are retried later.
    if (code === 0) return;
    if (code === 0x80 || (code === 0x97 && /rate/.test(reason))) {
      message.delivery = { state: "sending", attempts, error: reason };
      await this.options.store.update(message);
      this.emit({ type: "updated", message });
      const wait = Math.min(this.options.backoffMaxMs ?? 30_000, (this.options.backoffMinMs ?? 200) * 2 ** Math.min(attempts, 16));
      this.retryAt.set(item.conversation, setTimeout(() => {
        this.retryAt.delete(item.conversation);
        this.serial(() => this.pump(item.conversation));
      }, wait));
      return;
    }
    message.delivery = { state: "failed", code, reason };
    this.outbox = this.outbox.filter((i) => i.msgId !== item.msgId);
    await this.options.store.update(message, (await this.options.store.conversation(item.conversation)) ?? newRecord(item.conversation));
    this.emit({ type: "updated", message });
    await this.pump(item.conversation);
  }

  private async sendResult(result: mqtt_im.v1.ISendResult) {
    const message = await this.options.store.message(this.uid, result.msgId ?? "");
    if (!message) return;
    await this.confirmOwn(message, Number(result.seq ?? 0), Number(result.serverTime ?? 0));
  }

  /** An own message the server has (answer, History or digest): sent, out of the outbox. */
  private async confirmOwn(message: Message, seq: number, serverTime: number) {
    const conversation = message.conversation;
    if (this.inFlight.get(conversation) === message.msgId) this.inFlight.delete(conversation);
    this.outbox = this.outbox.filter((i) => i.msgId !== message.msgId);
    if (message.delivery.state !== "sent" && message.delivery.state !== "failed" && seq > 0) {
      const record = (await this.options.store.conversation(conversation)) ?? newRecord(conversation);
      hold(record, seq);
      record.lastTime = Math.max(record.lastTime, serverTime);
      Object.assign(message, { seq, serverTime, delivery: { state: "sent" } });
      await this.options.store.update(message, record);
      this.emit({ type: "updated", message });
    }
    await this.pump(conversation);
  }

  // ---- incoming --------------------------------------------------------------------

  private fromWire(conversation: string, chat: mqtt_im.v1.IChatMessage): Message {
    const content: Content = chat.msg?.media
      ? { media: { mime: chat.msg.media.mime ?? "", url: chat.msg.media.url ?? "", data: chat.msg.media.data ?? undefined } }
      : { text: chat.msg?.text ?? "" };
    const seq = Number(chat.seq ?? 0);
    return {
      conversation,
      msgId: chat.msgId ?? "",
      from: chat.from ?? "",
      seq: seq > 0 ? seq : undefined,
      time: Number(chat.time ?? 0),
      serverTime: Number(chat.serverTime ?? 0),
      content,
      delivery: chat.from === this.uid ? { state: "sent" } : { state: "received" },
    };
  }

  private async incoming(topic: string, payload: Uint8Array) {
    try {
      if (topic === this.inbox) {
        const chat = pb.Envelope.decode(payload).chat;
        if (chat) await this.live(`u/${chat.from}`, chat);
      } else if (topic === `${this.inbox}/digest`) {
        await this.digest(pb.Digest.decode(payload));
      } else if (topic === `${this.inbox}/resp`) {
        const response = pb.Response.decode(payload);
        if (this.answered(response)) return;
        if (response.sendResult) await this.sendResult(response.sendResult);
        else if (response.receipts) await this.receiptsMoved(response.receipts);
      } else if (topic.startsWith(`${this.prefix}/g/`)) {
        const chat = pb.Envelope.decode(payload).chat;
        if (chat) await this.live(`g/${topic.slice(this.prefix.length + 3)}`, chat);
      }
    } catch (error) {
      // A payload this client cannot decode is acknowledged and skipped.
      if (!(error instanceof Error && /invalid|index out of range|wire type/i.test(error.message))) throw error;
    }
  }

  private async unreadOf(record: ConversationRecord): Promise<number> {
    const own = await this.options.store.countFrom(record.id, this.uid, record.readSeq);
    return Math.max(0, record.maxSeq - record.readSeq - own);
  }

  /** Stores new messages with the record, confirms own ones, tells the app; returns how many were new. */
  private async apply(record: ConversationRecord, messages: Message[]): Promise<number> {
    for (const m of messages) {
      if (m.seq) hold(record, m.seq);
      record.lastTime = Math.max(record.lastTime, m.serverTime ?? 0);
    }
    const before = await this.unreadOf((await this.options.store.conversation(record.id)) ?? newRecord(record.id));
    const fresh = await this.options.store.insert(record, messages);
    let added = 0;
    for (const [i, message] of messages.entries()) {
      if (fresh[i]) {
        added++;
        this.emit({ type: "message", message });
      } else if (message.from === this.uid) {
        const local = await this.options.store.message(this.uid, message.msgId);
        if (local?.delivery.state === "sending") await this.confirmOwn(local, message.seq ?? 0, message.serverTime ?? 0);
      }
    }
    const after = await this.unreadOf(record);
    if (after !== before) this.emit({ type: "unread", conversation: record.id, unread: after });
    return added;
  }

  private async record(id: string) {
    return (await this.options.store.conversation(id)) ?? newRecord(id);
  }

  private async live(conversation: string, chat: mqtt_im.v1.IChatMessage) {
    await this.apply(await this.record(conversation), [this.fromWire(conversation, chat)]);
    await this.fillHoles(conversation);
  }

  private async digest(digest: mqtt_im.v1.Digest) {
    for (const [name, session] of Object.entries(digest.sessions)) {
      if (!/^[ug]\/[A-Za-z0-9_.@-]{1,64}$/.test(name)) continue;
      if (name.startsWith("g/")) await this.joined(name.slice(2));
      const record = await this.record(name);
      record.maxSeq = Math.max(record.maxSeq, Number(session.maxSeq ?? 0));
      record.readSeq = Math.max(record.readSeq, Number(session.readSeq ?? 0));
      record.lastTime = Math.max(record.lastTime, Number(session.timestamp ?? 0));
      if (Number(session.unacked ?? 0) > 0) record.pullEnd = false;
      const missed = Number(session.missed ?? 0);
      if (missed > 0) {
        record.missed += missed;
        this.emit({ type: "missed", conversation: name, count: missed });
      }
      const peerRead = Number(session.peerReadSeq ?? 0);
      const moved = peerRead > record.peerReadSeq;
      record.peerReadSeq = Math.max(record.peerReadSeq, peerRead);
      await this.apply(record, (session.lastMsgs ?? []).map((chat) => this.fromWire(name, chat)));
      if (moved && name.startsWith("u/")) await this.readerMoved(name, name.slice(2), peerRead);
      await this.fillHoles(name);
    }
    this.ask({ clearCounters: { version: digest.version } }).catch(() => undefined);
    this.emit({ type: "connection", state: "online" });
  }

  private async readerMoved(conversation: string, uid: string, readSeq: number) {
    await this.options.store.setReader(conversation, uid, readSeq);
    this.emit({ type: "read", conversation, uid, readSeq });
  }

  private async receiptsMoved(list: mqtt_im.v1.IReceiptList) {
    const conversation = list.conversation ?? "";
    const reads = list.reads ?? [];
    const record = await this.options.store.conversation(conversation);
    if (!record) return;
    const furthest = Math.max(0, ...reads.map((r) => Number(r.readSeq ?? 0)));
    if (furthest > record.peerReadSeq) {
      record.peerReadSeq = furthest;
      await this.apply(record, []);
    }
    for (const read of reads) await this.readerMoved(conversation, read.uid ?? "", Number(read.readSeq ?? 0));
  }

  private async joined(gid: string) {
    if (this.groups.has(gid)) return;
    this.groups.add(gid);
    if (!(await this.options.store.conversation(`g/${gid}`))) await this.options.store.insert(newRecord(`g/${gid}`), []);
    if (this.online) this.mqtt.subscribe(`${this.prefix}/g/${gid}`, { qos: 1 });
  }

  // ---- pages -------------------------------------------------------------------------

  private async fillHoles(conversation: string) {
    if (!this.online || this.filling.has(conversation)) return;
    const hole = holes(await this.record(conversation))[0];
    if (!hole) return;
    this.filling.add(conversation);
    const pageSize = Math.min(hole.hi - hole.lo + 1, HOLE_PAGE);
    this.ask({ history: { conversation, beforeSeq: hole.hi + 1, pageSize } }).then(
      (response) => this.serial(async () => {
        this.filling.delete(conversation);
        if (response.page) await this.page(conversation, "hole", response.page);
        await this.fillHoles(conversation);
      }),
      () => this.filling.delete(conversation),
    );
  }

  private async page(conversation: string, kind: PageKind, page: mqtt_im.v1.IPage): Promise<{ added: number; end: boolean; followUp?: SeqRange }> {
    const record = await this.record(conversation);
    const gone = Number(page.gone ?? 0);
    if (gone > 0) {
      record.gone += gone;
      this.emit({ type: "gone", conversation, count: gone });
    }
    let followUp: SeqRange | undefined;
    if (kind === "pull") {
      record.pullCursor = page.cursor ? { lo: Number(page.cursor.fromSeq ?? 0), hi: Number(page.cursor.toSeq ?? 0) } : undefined;
      if (page.end) {
        if (record.pullCursor) followUp = record.pullCursor;
        else record.pullEnd = true;
        record.pullCursor = undefined;
      }
    }
    const added = await this.apply(record, (page.messages ?? []).map((chat) => this.fromWire(conversation, chat)));
    return { added, end: Boolean(page.end) && kind !== "hole" && !followUp, followUp };
  }

  /** Fetches older messages into the local store: unacknowledged ones (Pull, pull-as-ack), then holes, then History. */
  fetchOlder(conversation: string, limit = this.options.pageSize ?? 50): Promise<{ added: number; end: boolean }> {
    return this.serial(async () => {
      const record = await this.record(conversation);
      const name = conversation;
      if (!record.pullEnd) {
        const ack = record.pullCursor ? { fromSeq: record.pullCursor.lo, toSeq: record.pullCursor.hi } : undefined;
        return { kind: "pull" as PageKind, request: { pull: { conversation: name, pageSize: limit, ack } } };
      }
      const hole = holes(record)[0];
      if (hole) return { kind: "hole" as PageKind, request: { history: { conversation: name, beforeSeq: hole.hi + 1, pageSize: Math.min(limit, hole.hi - hole.lo + 1) } } };
      const oldest = record.held[0];
      if (oldest && oldest.lo <= 1) return undefined;
      return { kind: "history" as PageKind, request: { history: { conversation: name, beforeSeq: oldest?.lo ?? 0, pageSize: limit } } };
    }).then(async (next) => {
      if (!next) return { added: 0, end: true };
      const response = await this.ask(next.request);
      const result = await this.serial(() => this.page(conversation, next.kind, response.page ?? {}));
      let end = result.end;
      if (result.followUp) {
        // The last page is acknowledged by one more Pull naming it.
        const ack = { fromSeq: result.followUp.lo, toSeq: result.followUp.hi };
        const last = await this.ask({ pull: { conversation, pageSize: limit, ack } });
        end = (await this.serial(() => this.page(conversation, "pull", last.page ?? {}))).end;
      }
      await this.serial(() => this.fillHoles(conversation));
      return { added: result.added, end };
    });
  }

  /** Moves this user's read cursor (never back); resolves with the cursor now. */
  async markRead(conversation: string, seq: number): Promise<number> {
    const response = await this.ask({ markRead: { conversation, seq } });
    const readSeq = Number(response.read?.readSeq ?? seq);
    await this.serial(async () => {
      const record = await this.record(conversation);
      if (readSeq > record.readSeq) {
        record.readSeq = readSeq;
        await this.apply(record, []);
      }
    });
    return readSeq;
  }

  async receipts(conversation: string, seqs: number[]) {
    const response = await this.ask({ receipts: { conversation, seqs } });
    return (response.receipts?.receipts ?? []).map((r) => ({ seq: Number(r.seq), readCount: r.readCount ?? 0, readers: r.readers ?? [] }));
  }

  async createGroup(gid: string, members: string[]) {
    await this.ask({ groupCreate: { gid, members } });
    await this.serial(() => this.joined(gid));
  }

  /** Joins the conversation of a group someone else added this user to. */
  joinGroup(gid: string) {
    return this.serial(() => this.joined(gid));
  }

  async forgetDevice(deviceId: string) {
    await this.ask({ deviceForget: { clientId: deviceId } });
  }

  // ---- local state -------------------------------------------------------------------

  async conversations(): Promise<Conversation[]> {
    const list: Conversation[] = [];
    for (const record of await this.options.store.conversations()) list.push(await this.view(record));
    return list.sort((a, b) => b.lastTime - a.lastTime || a.id.localeCompare(b.id));
  }

  async conversation(id: string): Promise<Conversation | undefined> {
    const record = await this.options.store.conversation(id);
    return record && this.view(record);
  }

  private async view(record: ConversationRecord): Promise<Conversation> {
    const [lastMessage] = await this.options.store.messages(record.id, undefined, 1);
    const { id, maxSeq, readSeq, peerReadSeq, lastTime, missed, gone } = record;
    return { id, unread: await this.unreadOf(record), maxSeq, readSeq, peerReadSeq, lastTime, missed, gone, lastMessage };
  }

  messages(conversation: string, before?: number, limit = 50): Promise<Message[]> {
    return this.options.store.messages(conversation, before, limit);
  }

  async unread(): Promise<{ total: number; conversations: Array<[string, number]> }> {
    const withUnread = (await this.conversations()).filter((c) => c.unread > 0);
    return { total: withUnread.reduce((sum, c) => sum + c.unread, 0), conversations: withUnread.map((c) => [c.id, c.unread]) };
  }

  readers(conversation: string) {
    return this.options.store.readers(conversation);
  }

  /** Disconnects; what is unsent stays in the outbox for the next start. */
  async close() {
    this.closed = true;
    if (this.reconnecting) clearTimeout(this.reconnecting);
    for (const timer of this.retryAt.values()) clearTimeout(timer);
    for (const pending of this.requests.values()) clearTimeout(pending.timer);
    // A clean DISCONNECT, unless the link is too dead to carry it within a second.
    const forced = new Promise<void>((resolve) => setTimeout(resolve, 1000).unref?.());
    await Promise.race([this.mqtt.endAsync(), forced]);
    if (!this.mqtt.disconnected) await this.mqtt.endAsync(true);
  }
}
