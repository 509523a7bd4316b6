//! Redis as the digest's cache for the PostgreSQL backend: per device and conversation the
//! badge counters, per conversation the newest messages. PostgreSQL stays the truth.
//!
//! Every cached counter carries the state it was counted against — the conversation's last
//! seq, the device's cleared floor and how many seqs it has acknowledged, all three only ever
//! growing — and the digest uses it only when those still equal what PostgreSQL says now.
//! Previews are used only when their seqs are exactly the newest of the conversation. So a
//! lost, late, reordered or flushed Redis write can make the digest slower (it recounts that
//! conversation from PostgreSQL and writes the result back), never wrong.

use crate::domain::Uid;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::store::redis::{user_key, BoundedRedis};
use crate::store::RedisSettings;
use crate::store::{Device, NewMessage, StoreError, StoredMessage};

/// Cached keys of devices and conversations unused this long disappear.
const IDLE_TTL_SECS: u64 = 30 * 24 * 3600;
/// What a digest carried is kept this long for its `ClearCounters`.
const CARRIED_TTL_SECS: u64 = 24 * 3600;
/// How long the cache is skipped after a failed call.
const BACKOFF: Duration = Duration::from_secs(1);
/// Batches of appended messages waiting for Redis; when full, the cache is left behind and
/// heals on the next digest.
const UPDATE_QUEUE: usize = 256;

/// Advances every cached counter of the conversation's members by one message, but only a
/// counter that has counted exactly the seqs before it (anything else is left to be
/// recounted), and adds the message to the conversation's previews if they are cached (or
/// start with it).
///
/// Called once per hash slot on a Redis Cluster (once on one server), with what of each
/// message lives there. KEYS[1]: a key of the slot. ARGV: prefix, previews kept, ttl, then
/// per message: conversation, seq, sender, sender's device, preview ('' when the previews
/// live elsewhere), member count, members (those whose keys live here).
const APPENDED: &str = r"
local p, keep, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local devices, counters, dirty, previews = {}, {}, {}, {}
local function devices_of(uid)
  if not devices[uid] then
    devices[uid] = redis.call('SMEMBERS', p .. ':{u:' .. uid .. '}:devs')
  end
  return devices[uid]
end
local function counter(key, conv, seq)
  local id = key .. '\0' .. conv
  local c = counters[id]
  if c == nil then
    local v = redis.call('HGET', key, conv)
    if v then
      local u, f, a, n, un = string.match(v, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
      c = {tonumber(u), tonumber(f), tonumber(a), tonumber(n), tonumber(un), key, conv}
    elseif seq == 1 then
      c = {0, 0, 0, 0, 0, key, conv}
    else
      c = false
    end
    counters[id] = c
  end
  return c
end
local i = 4
while i <= #ARGV do
  local conv, seq, sender, sdev = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 5])
  if keep > 0 and ARGV[i + 4] ~= '' then
    local entries = previews[conv]
    if entries == nil then
      local last = p .. ':last:' .. conv
      entries = (seq == 1 or redis.call('EXISTS', last) == 1) and {} or false
      previews[conv] = entries
    end
    if entries then
      entries[#entries + 1] = seq
      entries[#entries + 1] = ARGV[i + 4]
    end
  end
  for m = i + 6, i + 5 + n do
    local uid = ARGV[m]
    for _, client in ipairs(devices_of(uid)) do
      local c = counter(p .. ':{u:' .. uid .. '}:cnt:' .. client, conv, seq)
      if c and seq == c[1] + 1 then
        c[1] = seq
        if uid ~= sender then c[4] = c[4] + 1 end
        if not (uid == sender and client == sdev) then c[5] = c[5] + 1 end
        dirty[c] = true
      end
    end
  end
  i = i + 6 + n
end
local touched = {}
for c in pairs(dirty) do
  redis.call('HSET', c[6], c[7], string.format('%d %d %d %d %d', c[1], c[2], c[3], c[4], c[5]))
  touched[c[6]] = true
end
for key in pairs(touched) do
  redis.call('EXPIRE', key, ttl)
end
for conv, entries in pairs(previews) do
  if entries and #entries > 0 then
    local last = p .. ':last:' .. conv
    for from = 1, #entries, 1000 do
      redis.call('ZADD', last, unpack(entries, from, math.min(from + 999, #entries)))
    end
    redis.call('ZREMRANGEBYRANK', last, 0, -(keep + 1))
    redis.call('EXPIRE', last, ttl)
  end
end
return 0";

/// Stores recounted counters unless Redis already holds a later state (every part of the
/// state only grows), and lists the device among its user's cached devices.
///
/// KEYS: counters, devices of the user. ARGV: client id, ttl, then per conversation:
/// conversation, seq, floor, acked, count, unacked.
const SAVE_COUNTERS: &str = r"
for i = 3, #ARGV, 6 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local newer = true
  if cur then
    local u, f, a = string.match(cur, '^(%d+) (%d+) (%d+)')
    newer = tonumber(ARGV[i + 1]) >= tonumber(u) and tonumber(ARGV[i + 2]) >= tonumber(f)
      and tonumber(ARGV[i + 3]) >= tonumber(a)
  end
  if newer then
    redis.call('HSET', KEYS[1], ARGV[i], table.concat(ARGV, ' ', i + 1, i + 5))
  end
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 0";

/// After `ClearCounters`: a counter still at the state the digest saw (same floor, same
/// acknowledgements) moves its floor to the digest's seq and drops what the digest carried.
///
/// KEYS: counters, what the digest carried.
const CLEARED: &str = r"
local carried = redis.call('HGETALL', KEYS[2])
for i = 1, #carried, 2 do
  local cu, cf, ca, cc = string.match(carried[i + 1], '^(%d+) (%d+) (%d+) (%d+)$')
  cu, cf, ca, cc = tonumber(cu), tonumber(cf), tonumber(ca), tonumber(cc)
  local cur = redis.call('HGET', KEYS[1], carried[i])
  if cur then
    local u, f, a, c, un = string.match(cur, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
    u, f, a, c, un = tonumber(u), tonumber(f), tonumber(a), tonumber(c), tonumber(un)
    if f == cf and a == ca and u >= cu and cu > f then
      redis.call('HSET', KEYS[1], carried[i],
        string.format('%d %d %d %d %d', u, cu, a, math.max(c - cc, 0), un))
    end
  end
end
return 0";

/// Drops what the cache holds of conversations whose stored messages changed other than by
/// appends (an erasure): their previews, and their counters in every member's devices.
///
/// Called per hash slot like [`APPENDED`]. KEYS[1]: a key of the slot. ARGV: prefix, then
/// per conversation: conversation, '1' if its previews live here (else ''), member count,
/// members (those whose keys live here).
const FORGET_CONVERSATIONS: &str = r"
local p = ARGV[1]
local i = 2
while i <= #ARGV do
  local conv, n = ARGV[i], tonumber(ARGV[i + 2])
  if ARGV[i + 1] ~= '' then
    redis.call('DEL', p .. ':last:' .. conv)
  end
  for m = i + 3, i + 2 + n do
    local uid = ARGV[m]
    for _, client in ipairs(redis.call('SMEMBERS', p .. ':{u:' .. uid .. '}:devs')) do
      redis.call('HDEL', p .. ':{u:' .. uid .. '}:cnt:' .. client, conv)
    end
  end
  i = i + 3 + n
end
return 0";

/// The state a device's counters of one conversation were counted against, and the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Counted {
    /// The conversation's last seq.
    pub(super) max_seq: u64,
    /// The device's cleared floor: only seqs above it are counted.
    pub(super) floor: u64,
    /// How many seqs the device has acknowledged (acknowledgements are never taken back).
    pub(super) acked: u64,
    /// Messages from others above the floor not acknowledged.
    pub(super) count: u64,
    /// Messages not acknowledged, the device's own excluded.
    pub(super) unacked: u64,
}

impl Counted {
    /// Counts cached against this very state.
    fn matches(&self, state: &Counted) -> bool {
        (self.max_seq, self.floor, self.acked) == (state.max_seq, state.floor, state.acked)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ').map(str::parse::<u64>);
        let mut next = || parts.next().and_then(Result::ok);
        Some(Self {
            max_seq: next()?,
            floor: next()?,
            acked: next()?,
            count: next()?,
            unacked: next()?,
        })
    }
}

/// How often the cache answered and how often PostgreSQL had to, for operators and tests.
#[derive(Debug, Default)]
pub(super) struct CacheStats {
    /// Conversations whose counters came from Redis.
    pub(super) counter_hits: AtomicU64,
    /// Conversations recounted in PostgreSQL.
    pub(super) counter_misses: AtomicU64,
    /// Conversations whose previews came from Redis.
    pub(super) preview_hits: AtomicU64,
    /// Conversations whose previews were read from PostgreSQL.
    pub(super) preview_misses: AtomicU64,
}

/// A message as the cache learns it after its commit.
#[derive(Debug)]
pub(super) struct Committed {
    pub(super) seq: u64,
    pub(super) message: NewMessage,
}

/// The Redis cache of one deployment (all keys under its prefix).
#[derive(Clone)]
pub struct DigestCache {
    redis: BoundedRedis,
    prefix: String,
    keep: usize,
    /// After a failure the cache is skipped until then, so that an unreachable Redis costs
    /// one time-out, not one per digest.
    skip_until: std::sync::Arc<Mutex<Instant>>,
    stats: std::sync::Arc<CacheStats>,
    /// Redis calls that failed (the digest then comes from PostgreSQL alone).
    errors: Counter,
}

impl std::fmt::Debug for DigestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestCache")
            .field("prefix", &self.prefix)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl DigestCache {
    /// The cache on Redis at `url`; `keep` previews are cached per conversation (the
    /// digest's last N). It connects on first use, so the store opens while Redis is down.
    /// Calls that get no answer within `timeout` fail, and the digest does without them;
    /// each failure is counted in `errors`.
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn new(
        redis: &RedisSettings<'_>,
        keep: usize,
        errors: Counter,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            redis: BoundedRedis::new(redis.url, redis.cluster, redis.timeout)?,
            prefix: redis.prefix.to_owned(),
            keep,
            skip_until: std::sync::Arc::new(Mutex::new(Instant::now())),
            stats: std::sync::Arc::default(),
            errors,
        })
    }

    #[cfg(test)]
    pub(super) fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Runs one Redis call within the time-out; `None` if it failed or Redis is being skipped
    /// after a recent failure (the caller goes on without the cache).
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        let skip_until = self
            .skip_until
            .lock()
            .map(|at| *at)
            .unwrap_or_else(|_| Instant::now());
        if Instant::now() < skip_until {
            return None;
        }
        let error = match request.await {
            Ok(value) => return Some(value),
            Err(e) => e.to_string(),
        };
        self.errors.inc();
        if let Ok(mut at) = self.skip_until.lock() {
            *at = Instant::now() + BACKOFF;
        }
        tracing::warn!(
            error,
            "digest cache: {what} failed; using PostgreSQL alone for a while"
        );
        None
    }

    fn counters_key(&self, device: &Device) -> String {
        let what = format!("cnt:{}", device.client_id);
        user_key(&self.prefix, &device.uid, &what)
    }

    fn devices_key(&self, uid: &str) -> String {
        user_key(&self.prefix, uid, "devs")
    }

    fn carried_key(&self, device: &Device, version: u64) -> String {
        // The version holds no ':', so the client id can be anything.
        let what = format!("dv:{version}:{}", device.client_id);
        user_key(&self.prefix, &device.uid, &what)
    }

    fn previews_key(&self, conversation: &str) -> String {
        format!("{}:last:{conversation}", self.prefix)
    }

    /// What the keys of `touched` (key, (record, previews or member)), in record order, come
    /// to per hash slot: a key of the slot, to call a script there, and each record's part.
    fn per_slot<T>(
        &self,
        touched: impl IntoIterator<Item = (String, (usize, Option<T>))>,
    ) -> Vec<(String, Vec<Touched<T>>)> {
        self.redis
            .by_slot(touched)
            .into_iter()
            .map(|(key, touched)| (key, by_record(touched)))
            .collect()
    }

    /// Starts the task that applies committed messages to the cache in commit order, off the
    /// append path; the returned sender never blocks.
    pub(super) fn spawn_updater(&self) -> CacheUpdates {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Committed>>(UPDATE_QUEUE);
        let cache = self.clone();
        let task = tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                cache.appended(&batch).await;
            }
        });
        CacheUpdates { tx, task }
    }

    async fn appended(&self, batch: &[Committed]) {
        let touched = batch.iter().enumerate().flat_map(|(at, committed)| {
            let message = &committed.message;
            let previews = (self.keep > 0)
                .then(|| (self.previews_key(&message.conversation.key()), (at, None)));
            let members = message.conversation.direct_members().into_iter().flatten();
            let members = members.map(move |uid| (self.devices_key(uid.as_str()), (at, Some(uid))));
            previews.into_iter().chain(members)
        });
        let script = redis::Script::new(APPENDED);
        let mut calls = Vec::new();
        for (key, records) in self.per_slot(touched) {
            let mut invocation = script.key(key);
            invocation
                .arg(&self.prefix)
                .arg(self.keep)
                .arg(IDLE_TTL_SECS);
            for Touched {
                record,
                previews,
                members,
            } in records
            {
                let (committed, message) = (&batch[record], &batch[record].message);
                let preview = if previews {
                    encode_preview(committed.seq, message)
                } else {
                    Vec::new()
                };
                let members: Vec<&str> = members.into_iter().map(Uid::as_str).collect();
                invocation
                    .arg(message.conversation.key())
                    .arg(committed.seq)
                    .arg(message.sender.as_str())
                    .arg(&message.sender_device)
                    .arg(preview)
                    .arg(members.len())
                    .arg(&members);
            }
            calls.push(invocation);
        }
        self.call("update after commit", self.redis.invoke_all(&calls))
            .await;
    }

    /// The cached counters of `device` for each conversation key, where they were counted
    /// against `states` (`None` where they must be recounted).
    pub(super) async fn counters(
        &self,
        device: &Device,
        conversations: &[(&str, Counted)],
    ) -> Vec<Option<Counted>> {
        let misses = || vec![None; conversations.len()];
        if conversations.is_empty() {
            return Vec::new();
        }
        let mut command = redis::cmd("HMGET");
        command.arg(self.counters_key(device));
        for (key, _) in conversations {
            command.arg(*key);
        }
        let mut connection = self.redis.connection();
        let read = command.query_async::<Vec<Option<String>>>(&mut connection);
        let Some(cached) = self.call("reading counters", self.redis.within(read)).await else {
            return misses();
        };
        let found: Vec<Option<Counted>> = cached
            .iter()
            .zip(conversations)
            .map(|(text, (_, state))| {
                text.as_deref()
                    .and_then(Counted::parse)
                    .filter(|counted| counted.matches(state))
            })
            .collect();
        let hits = found.iter().filter(|c| c.is_some()).count() as u64;
        self.stats.counter_hits.fetch_add(hits, Ordering::Relaxed);
        self.stats
            .counter_misses
            .fetch_add(found.len() as u64 - hits, Ordering::Relaxed);
        found
    }

    /// Stores counters recounted in PostgreSQL and enrols the device, so that messages
    /// arriving from now on are counted for it; failures only cost the next digest a recount.
    pub(super) async fn save_counters(&self, device: &Device, recounted: &[(&str, Counted)]) {
        let script = redis::Script::new(SAVE_COUNTERS);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.counters_key(device))
            .key(self.devices_key(&device.uid))
            .arg(&device.client_id)
            .arg(IDLE_TTL_SECS);
        for (key, counted) in recounted {
            invocation
                .arg(*key)
                .arg(counted.max_seq)
                .arg(counted.floor)
                .arg(counted.acked)
                .arg(counted.count)
                .arg(counted.unacked);
        }
        let mut connection = self.redis.connection();
        let save = invocation.invoke_async::<i64>(&mut connection);
        self.call("saving counters", self.redis.within(save)).await;
    }

    /// Remembers what digest `version` carried, for [`DigestCache::cleared`].
    pub(super) async fn record_digest(
        &self,
        device: &Device,
        version: u64,
        carried: &[(&str, Counted)],
    ) {
        if carried.is_empty() {
            return;
        }
        let key = self.carried_key(device, version);
        let mut pipe = redis::pipe();
        let fields: Vec<(&str, String)> = carried
            .iter()
            .map(|(conversation, c)| {
                let text = format!("{} {} {} {}", c.max_seq, c.floor, c.acked, c.count);
                (*conversation, text)
            })
            .collect();
        pipe.hset_multiple(&key, &fields)
            .ignore()
            .expire(&key, CARRIED_TTL_SECS as i64)
            .ignore();
        let mut connection = self.redis.connection();
        let record = pipe.query_async::<()>(&mut connection);
        self.call("recording a digest", self.redis.within(record))
            .await;
    }

    /// Drops the counters of forgotten devices, so a device that comes back under the same
    /// client id is counted afresh.
    pub(super) async fn forget_devices(&self, devices: &[Device]) {
        if devices.is_empty() {
            return;
        }
        let mut batch = self.redis.batch();
        for device in devices {
            let (counters, devices) = (self.counters_key(device), self.devices_key(&device.uid));
            batch.add(&counters, redis::Cmd::del(&counters));
            batch.add(&devices, redis::Cmd::srem(&devices, &device.client_id));
        }
        self.call("forgetting devices", self.redis.run(batch)).await;
    }

    /// Drops the previews and counters of conversations an erasure changed; `members` are
    /// each conversation's members.
    pub(super) async fn forget_conversations(&self, members: &[(String, Vec<String>)]) {
        if members.is_empty() {
            return;
        }
        let touched = members
            .iter()
            .enumerate()
            .flat_map(|(at, (conversation, uids))| {
                let previews = (self.previews_key(conversation), (at, None));
                let members = uids
                    .iter()
                    .map(move |uid| (self.devices_key(uid), (at, Some(uid))));
                std::iter::once(previews).chain(members)
            });
        let script = redis::Script::new(FORGET_CONVERSATIONS);
        let mut calls = Vec::new();
        for (key, records) in self.per_slot(touched) {
            let mut invocation = script.key(key);
            invocation.arg(&self.prefix);
            for Touched {
                record,
                previews,
                members: uids,
            } in records
            {
                invocation
                    .arg(&members[record].0)
                    .arg(if previews { "1" } else { "" })
                    .arg(uids.len())
                    .arg(uids);
            }
            calls.push(invocation);
        }
        self.call("forgetting conversations", self.redis.invoke_all(&calls))
            .await;
    }

    /// Applies a committed `ClearCounters` of digest `version` to the cached counters.
    pub(super) async fn cleared(&self, device: &Device, version: u64) {
        let script = redis::Script::new(CLEARED);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.counters_key(device))
            .key(self.carried_key(device, version));
        let mut connection = self.redis.connection();
        let clear = invocation.invoke_async::<i64>(&mut connection);
        self.call("clearing counters", self.redis.within(clear))
            .await;
    }

    /// The cached newest `n` messages of each conversation, where they are exactly the
    /// conversation's newest (`None` where they must be read from PostgreSQL).
    pub(super) async fn previews(
        &self,
        conversations: &[(&str, u64)],
        n: usize,
    ) -> Vec<Option<Vec<StoredMessage>>> {
        let misses = || vec![None; conversations.len()];
        if conversations.is_empty() || n == 0 || n > self.keep {
            return misses();
        }
        let mut batch = self.redis.batch();
        for (conversation, _) in conversations {
            let key = self.previews_key(conversation);
            batch.add(&key, redis::Cmd::zrevrange(&key, 0, n as isize - 1));
        }
        let Some(cached) = self.call("reading previews", self.redis.run(batch)).await else {
            return misses();
        };
        let found: Vec<Option<Vec<StoredMessage>>> = cached
            .into_iter()
            .zip(conversations)
            .map(|(entries, (_, max_seq))| {
                let entries: Vec<Vec<u8>> = redis::from_redis_value(entries).ok()?;
                newest_exactly(&entries, *max_seq, n)
            })
            .collect();
        let hits = found.iter().filter(|p| p.is_some()).count() as u64;
        self.stats.preview_hits.fetch_add(hits, Ordering::Relaxed);
        self.stats
            .preview_misses
            .fetch_add(found.len() as u64 - hits, Ordering::Relaxed);
        found
    }

    /// Caches previews read from PostgreSQL (newest first).
    pub(super) async fn save_previews(&self, read: &[(&str, &[StoredMessage])]) {
        if read.is_empty() || self.keep == 0 {
            return;
        }
        let mut batch = self.redis.batch();
        for (conversation, messages) in read {
            let key = self.previews_key(conversation);
            for message in messages.iter() {
                let entry = stored_preview(message);
                batch.add(&key, redis::Cmd::zadd(&key, entry, message.seq));
            }
            let oldest_kept = -(self.keep as isize + 1);
            batch.add(&key, redis::Cmd::zremrangebyrank(&key, 0, oldest_kept));
            batch.add(&key, redis::Cmd::expire(&key, IDLE_TTL_SECS as i64));
        }
        self.call("saving previews", self.redis.run(batch)).await;
    }
}

/// What one script call does for one record (a message, a conversation): whether the
/// record's previews live in the call's hash slot, and its members whose keys do.
struct Touched<T> {
    record: usize,
    previews: bool,
    members: Vec<T>,
}

/// Gathers consecutive touches of one record (`None`: its previews; `Some`: a member).
fn by_record<T>(touched: Vec<(usize, Option<T>)>) -> Vec<Touched<T>> {
    let mut records: Vec<Touched<T>> = Vec::new();
    for (record, what) in touched {
        if records.last().is_none_or(|last| last.record != record) {
            records.push(Touched {
                record,
                previews: false,
                members: Vec::new(),
            });
        }
        if let Some(last) = records.last_mut() {
            match what {
                None => last.previews = true,
                Some(member) => last.members.push(member),
            }
        }
    }
    records
}

/// Hands committed batches to the cache's updater without waiting for Redis.
#[derive(Debug)]
pub(super) struct CacheUpdates {
    tx: tokio::sync::mpsc::Sender<Vec<Committed>>,
    /// The updater, which ends once `tx` is gone and what was queued is applied.
    task: tokio::task::JoinHandle<()>,
}

impl CacheUpdates {
    /// Queues `batch`; when the queue is full the cache falls behind and is recounted later.
    pub(super) fn send(&self, batch: Vec<Committed>) {
        if batch.is_empty() {
            return;
        }
        if self.tx.try_send(batch).is_err() {
            tracing::debug!("digest cache updates queue full; counters will be recounted");
        }
    }

    /// Applies what is queued and ends the updater (the store is closing).
    pub(super) async fn finish(self) {
        let Self { tx, task } = self;
        drop(tx);
        let _ = task.await;
    }
}

/// Entries are `seq | server time | sender length | sender | body`, so a message has one
/// encoding and re-adding it changes nothing.
fn encode(seq: u64, server_time: i64, sender: &str, body: &[u8]) -> Vec<u8> {
    let sender_len = u16::try_from(sender.len()).unwrap_or(u16::MAX);
    let sender = &sender.as_bytes()[..usize::from(sender_len)];
    let mut out = Vec::with_capacity(18 + sender.len() + body.len());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&server_time.to_be_bytes());
    out.extend_from_slice(&sender_len.to_be_bytes());
    out.extend_from_slice(sender);
    out.extend_from_slice(body);
    out
}

fn encode_preview(seq: u64, message: &NewMessage) -> Vec<u8> {
    encode(seq, message.server_time, &message.sender, &message.body)
}

fn stored_preview(message: &StoredMessage) -> Vec<u8> {
    encode(
        message.seq,
        message.server_time,
        &message.sender,
        &message.body,
    )
}

fn decode(entry: &[u8]) -> Option<StoredMessage> {
    let seq = u64::from_be_bytes(entry.get(..8)?.try_into().ok()?);
    let server_time = i64::from_be_bytes(entry.get(8..16)?.try_into().ok()?);
    let sender_len = usize::from(u16::from_be_bytes(entry.get(16..18)?.try_into().ok()?));
    let sender = std::str::from_utf8(entry.get(18..18 + sender_len)?).ok()?;
    Some(StoredMessage {
        seq,
        sender: Uid::parse(sender).ok()?,
        server_time,
        body: entry.get(18 + sender_len..)?.to_vec(),
    })
}

/// The previews if they are the `n` newest seqs up to `max_seq`, without a hole.
fn newest_exactly(entries: &[Vec<u8>], max_seq: u64, n: usize) -> Option<Vec<StoredMessage>> {
    let expected = n.min(usize::try_from(max_seq).unwrap_or(usize::MAX));
    if entries.len() != expected {
        return None;
    }
    let messages: Vec<StoredMessage> = entries.iter().map(|e| decode(e)).collect::<Option<_>>()?;
    let consecutive = messages
        .iter()
        .zip((0..=max_seq).rev())
        .all(|(message, seq)| message.seq == seq);
    consecutive.then_some(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::uid;

    fn message(seq: u64) -> StoredMessage {
        StoredMessage {
            seq,
            sender: uid("alice"),
            server_time: 7,
            body: vec![1, 2, 3],
        }
    }

    #[test]
    fn previews_round_trip() {
        let original = message(42);
        assert_eq!(decode(&stored_preview(&original)), Some(original));
        assert_eq!(decode(&[0; 5]), None);
    }

    #[test]
    fn previews_are_used_only_when_they_are_the_newest_without_holes() {
        let entries = |seqs: &[u64]| -> Vec<Vec<u8>> {
            seqs.iter().map(|s| stored_preview(&message(*s))).collect()
        };
        assert!(newest_exactly(&entries(&[5, 4, 3]), 5, 3).is_some());
        assert!(newest_exactly(&entries(&[2, 1]), 2, 3).is_some());
        assert!(newest_exactly(&entries(&[4, 3, 2]), 5, 3).is_none());
        assert!(newest_exactly(&entries(&[5, 3, 2]), 5, 3).is_none());
        assert!(newest_exactly(&entries(&[5, 4]), 5, 3).is_none());
    }

    #[test]
    fn counters_match_only_their_own_state() {
        let cached = Counted::parse("9 2 4 3 5").unwrap();
        let state = Counted {
            max_seq: 9,
            floor: 2,
            acked: 4,
            ..Counted::default()
        };
        assert!(cached.matches(&state));
        assert!(!cached.matches(&Counted { acked: 5, ..state }));
        assert!(!cached.matches(&Counted {
            max_seq: 10,
            ..state
        }));
        assert_eq!(Counted::parse("9 2 x 3 5"), None);
    }
}
