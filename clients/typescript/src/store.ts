// The device's own database: conversations with their sync state, messages, the outbox and
// read cursors. IndexedDB in browsers, memory in Node (or bring your own `LocalStore`).

export type Delivery =
  | { state: "sending"; attempts: number; error?: string }
  | { state: "sent" }
  | { state: "failed"; code: number; reason: string }
  | { state: "received" };

export interface Content {
  text?: string;
  media?: { mime: string; url: string; data?: Uint8Array };
}

export interface Message {
  conversation: string;
  msgId: string;
  from: string;
  seq?: number;
  time: number;
  serverTime?: number;
  content: Content;
  delivery: Delivery;
}

/** Inclusive seq range. */
export interface SeqRange {
  lo: number;
  hi: number;
}

export interface ConversationRecord {
  id: string;
  maxSeq: number;
  readSeq: number;
  peerReadSeq: number;
  lastTime: number;
  missed: number;
  gone: number;
  /** Seqs held, merged, ascending. */
  held: SeqRange[];
  pullCursor?: SeqRange;
  pullEnd: boolean;
}

export interface OutboxItem {
  msgId: string;
  conversation: string;
  topic: string;
  payload: Uint8Array;
}

/** Each write is one transaction. */
export interface LocalStore {
  bindUser(uid: string): Promise<void>;
  conversation(id: string): Promise<ConversationRecord | undefined>;
  conversations(): Promise<ConversationRecord[]>;
  /** Saves the record and inserts the messages not held yet; returns which were new. */
  insert(record: ConversationRecord, messages: Message[]): Promise<boolean[]>;
  enqueue(message: Message, item: OutboxItem): Promise<void>;
  /** Replaces a message; with `done`, removes its outbox entry and saves the record. */
  update(message: Message, done?: ConversationRecord): Promise<void>;
  message(from: string, msgId: string): Promise<Message | undefined>;
  /** Newest first: without seq (sending, failed) first, then by seq below `before`. */
  messages(conversation: string, before: number | undefined, limit: number): Promise<Message[]>;
  /** Messages from `uid` with a seq above `after` (own messages are never unread). */
  countFrom(conversation: string, uid: string, after: number): Promise<number>;
  outbox(): Promise<OutboxItem[]>;
  setReader(conversation: string, uid: string, readSeq: number): Promise<void>;
  readers(conversation: string): Promise<Array<[string, number]>>;
}

export function newRecord(id: string): ConversationRecord {
  return { id, maxSeq: 0, readSeq: 0, peerReadSeq: 0, lastTime: 0, missed: 0, gone: 0, held: [], pullEnd: false };
}

/** Records `seq` as held (and known). */
export function hold(record: ConversationRecord, seq: number): void {
  record.maxSeq = Math.max(record.maxSeq, seq);
  const merged: SeqRange[] = [];
  let next = { lo: seq, hi: seq };
  for (const range of record.held) {
    if (range.hi + 1 < next.lo) merged.push(range);
    else if (next.hi + 1 < range.lo) {
      merged.push(next);
      next = range;
    } else next = { lo: Math.min(next.lo, range.lo), hi: Math.max(next.hi, range.hi) };
  }
  merged.push(next);
  record.held = merged;
}

/** Gaps between held ranges, newest first. */
export function holes(record: ConversationRecord): SeqRange[] {
  const found: SeqRange[] = [];
  for (let i = record.held.length - 1; i > 0; i--) {
    found.push({ lo: record.held[i - 1].hi + 1, hi: record.held[i].lo - 1 });
  }
  return found;
}

const key = (from: string, msgId: string) => `${from}\u0000${msgId}`;
const clone = <T>(value: T): T => structuredClone(value);

function newestFirst(all: Message[], before: number | undefined, limit: number): Message[] {
  const sending = before === undefined ? all.filter((m) => m.seq === undefined).reverse() : [];
  const stored = all
    .filter((m) => m.seq !== undefined && (before === undefined || m.seq < before))
    .sort((a, b) => (b.seq ?? 0) - (a.seq ?? 0));
  return [...sending, ...stored].slice(0, limit);
}

function countFrom(all: Message[], uid: string, after: number): number {
  return all.filter((m) => m.from === uid && (m.seq ?? 0) > after).length;
}

/** Everything in memory (Node, tests). */
export class MemoryStore implements LocalStore {
  private owner?: string;
  private records = new Map<string, ConversationRecord>();
  private byConversation = new Map<string, Message[]>();
  private byKey = new Map<string, Message>();
  private queue: OutboxItem[] = [];
  private reads = new Map<string, Map<string, number>>();

  async bindUser(uid: string) {
    if (this.owner !== undefined && this.owner !== uid) throw new Error(`the local store belongs to ${this.owner}`);
    this.owner = uid;
  }
  async conversation(id: string) {
    const record = this.records.get(id);
    return record && clone(record);
  }
  async conversations() {
    return [...this.records.values()].map(clone);
  }
  private add(message: Message): boolean {
    const k = key(message.from, message.msgId);
    if (this.byKey.has(k)) return false;
    const stored = clone(message);
    this.byKey.set(k, stored);
    const list = this.byConversation.get(message.conversation) ?? [];
    list.push(stored);
    this.byConversation.set(message.conversation, list);
    return true;
  }
  async insert(record: ConversationRecord, messages: Message[]) {
    this.records.set(record.id, clone(record));
    return messages.map((m) => this.add(m));
  }
  async enqueue(message: Message, item: OutboxItem) {
    this.add(message);
    this.queue.push(clone(item));
  }
  async update(message: Message, done?: ConversationRecord) {
    const stored = this.byKey.get(key(message.from, message.msgId));
    if (stored) Object.assign(stored, clone(message));
    if (done) {
      this.queue = this.queue.filter((i) => i.msgId !== message.msgId);
      this.records.set(done.id, clone(done));
    }
  }
  async message(from: string, msgId: string) {
    const stored = this.byKey.get(key(from, msgId));
    return stored && clone(stored);
  }
  async messages(conversation: string, before: number | undefined, limit: number) {
    return newestFirst(this.byConversation.get(conversation) ?? [], before, limit).map(clone);
  }
  async countFrom(conversation: string, uid: string, after: number) {
    return countFrom(this.byConversation.get(conversation) ?? [], uid, after);
  }
  async outbox() {
    return this.queue.map(clone);
  }
  async setReader(conversation: string, uid: string, readSeq: number) {
    const of = this.reads.get(conversation) ?? new Map<string, number>();
    of.set(uid, Math.max(of.get(uid) ?? 0, readSeq));
    this.reads.set(conversation, of);
  }
  async readers(conversation: string) {
    return [...(this.reads.get(conversation) ?? new Map<string, number>()).entries()];
  }
}

/** IndexedDB, one database per user and device (browsers). */
export class IndexedDbStore implements LocalStore {
  private constructor(private db: IDBDatabase) {}

  static open(name: string, factory: IDBFactory = indexedDB): Promise<IndexedDbStore> {
    return new Promise((resolve, reject) => {
      const request = factory.open(name, 1);
      request.onupgradeneeded = () => {
        const db = request.result;
        db.createObjectStore("meta");
        db.createObjectStore("conversations", { keyPath: "id" });
        const messages = db.createObjectStore("messages", { keyPath: "key" });
        messages.createIndex("conversation", "message.conversation");
        db.createObjectStore("outbox", { keyPath: "position", autoIncrement: true }).createIndex("msgId", "msgId", { unique: true });
        db.createObjectStore("readers", { keyPath: ["conversation", "uid"] });
      };
      request.onsuccess = () => resolve(new IndexedDbStore(request.result));
      request.onerror = () => reject(request.error);
    });
  }

  private run<T>(stores: string[], mode: IDBTransactionMode, work: (tx: IDBTransaction) => Promise<T> | T): Promise<T> {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(stores, mode);
      let result: T;
      Promise.resolve(work(tx)).then((value) => (result = value), reject);
      tx.oncomplete = () => resolve(result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  async bindUser(uid: string) {
    await this.run(["meta"], "readwrite", async (tx) => {
      const meta = tx.objectStore("meta");
      const owner = await req<string | undefined>(meta.get("uid"));
      if (owner !== undefined && owner !== uid) throw new Error(`the local store belongs to ${owner}`);
      meta.put(uid, "uid");
    });
  }
  conversation(id: string) {
    return this.run(["conversations"], "readonly", (tx) => req<ConversationRecord | undefined>(tx.objectStore("conversations").get(id)));
  }
  conversations() {
    return this.run(["conversations"], "readonly", (tx) => req<ConversationRecord[]>(tx.objectStore("conversations").getAll()));
  }
  insert(record: ConversationRecord, messages: Message[]) {
    return this.run(["conversations", "messages"], "readwrite", async (tx) => {
      tx.objectStore("conversations").put(record);
      const store = tx.objectStore("messages");
      const fresh: boolean[] = [];
      for (const message of messages) {
        const k = key(message.from, message.msgId);
        const exists = (await req<number>(store.count(k))) > 0;
        if (!exists) store.put({ key: k, message });
        fresh.push(!exists);
      }
      return fresh;
    });
  }
  enqueue(message: Message, item: OutboxItem) {
    return this.run(["messages", "outbox"], "readwrite", (tx) => {
      tx.objectStore("messages").put({ key: key(message.from, message.msgId), message });
      tx.objectStore("outbox").put(item);
    });
  }
  update(message: Message, done?: ConversationRecord) {
    return this.run(["messages", "outbox", "conversations"], "readwrite", async (tx) => {
      tx.objectStore("messages").put({ key: key(message.from, message.msgId), message });
      if (!done) return;
      tx.objectStore("conversations").put(done);
      const position = await req<IDBValidKey | undefined>(tx.objectStore("outbox").index("msgId").getKey(message.msgId));
      if (position !== undefined) tx.objectStore("outbox").delete(position);
    });
  }
  message(from: string, msgId: string) {
    return this.run(["messages"], "readonly", async (tx) => {
      const row = await req<{ message: Message } | undefined>(tx.objectStore("messages").get(key(from, msgId)));
      return row?.message;
    });
  }
  messages(conversation: string, before: number | undefined, limit: number) {
    return this.run(["messages"], "readonly", async (tx) => {
      const rows = await req<Array<{ message: Message }>>(tx.objectStore("messages").index("conversation").getAll(conversation));
      return newestFirst(rows.map((r) => r.message), before, limit);
    });
  }
  countFrom(conversation: string, uid: string, after: number) {
    return this.run(["messages"], "readonly", async (tx) => {
      const rows = await req<Array<{ message: Message }>>(tx.objectStore("messages").index("conversation").getAll(conversation));
      return countFrom(rows.map((r) => r.message), uid, after);
    });
  }
  outbox() {
    return this.run(["outbox"], "readonly", (tx) => req<OutboxItem[]>(tx.objectStore("outbox").getAll()));
  }
  setReader(conversation: string, uid: string, readSeq: number) {
    return this.run(["readers"], "readwrite", async (tx) => {
      const store = tx.objectStore("readers");
      const row = await req<{ readSeq: number } | undefined>(store.get([conversation, uid]));
      store.put({ conversation, uid, readSeq: Math.max(row?.readSeq ?? 0, readSeq) });
    });
  }
  readers(conversation: string) {
    return this.run(["readers"], "readonly", async (tx) => {
      const rows = await req<Array<{ conversation: string; uid: string; readSeq: number }>>(tx.objectStore("readers").getAll());
      return rows.filter((r) => r.conversation === conversation).map((r) => [r.uid, r.readSeq] as [string, number]);
    });
  }
}

function req<T>(request: IDBRequest): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result as T);
    request.onerror = () => reject(request.error);
  });
}
