//! Group-committed appends: every append waiting at that moment goes into one transaction of
//! a handful of set-based statements (dedup lookup, conversation upsert, seq reservation,
//! one multi-row insert), whatever the batch size.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::{mpsc, oneshot};

use super::cache::{CacheUpdates, Committed};
use super::error::Cells;
use super::error::PostgresError;
use super::{pg_error, uint, Lease};
use crate::store::bounded::bounded;
use crate::store::{Appended, NewMessage, OnCommit, StoreError};
use crate::throttle::Throttle;

/// One waiting append.
pub(super) struct Request {
    pub(super) message: NewMessage,
    pub(super) on_commit: Option<OnCommit>,
    pub(super) reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The one task that commits appends, batch by batch.
pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) max_batch: usize,
    /// A batch not committed within this fails as unavailable (it may still commit; the
    /// retransmissions are then duplicates).
    pub(super) limit: Duration,
    /// Where committed messages go for the digest cache, if there is one.
    pub(super) cache: Option<CacheUpdates>,
}

impl Writer {
    /// Runs batches until every sender is dropped.
    pub(super) async fn run(self, mut requests: mpsc::Receiver<Request>) {
        let failures = Throttle::default();
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = requests.recv().await {
            batch.push(first);
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let messages: Vec<&NewMessage> = batch.iter().map(|r: &Request| &r.message).collect();
            let outcome = bounded(self.limit, commit(&self.pool, &messages))
                .await
                .map_err(Arc::new);
            if let Err(e) = &outcome {
                if let Some(also) = failures.admit() {
                    tracing::error!(error = %e, messages = batch.len(), also_since_last = also, "append batch failed");
                }
            }
            self.answer(&mut batch, &outcome);
        }
        if let Some(cache) = self.cache {
            cache.finish().await;
        }
    }

    /// Tells each request of the batch its outcome (running its commit hook on success) and
    /// passes what was committed to the digest cache.
    fn answer(&self, batch: &mut Vec<Request>, outcome: &Result<Vec<Appended>, Arc<StoreError>>) {
        let mut committed = Vec::new();
        for (index, request) in batch.drain(..).enumerate() {
            let Request {
                message,
                on_commit,
                reply,
            } = request;
            let result = match outcome {
                Ok(appended) => Ok(appended[index]),
                Err(cause) => Err(StoreError::of_batch(cause)),
            };
            if let (Ok(appended), Some(on_commit)) = (&result, on_commit) {
                on_commit(appended);
            }
            let fresh = result.as_ref().ok().filter(|a| !a.duplicate).map(|a| a.seq);
            let _ = reply.send(result);
            if let (Some(_), Some(seq)) = (&self.cache, fresh) {
                committed.push(Committed { seq, message });
            }
        }
        if let Some(cache) = &self.cache {
            cache.send(committed);
        }
    }
}

/// What each message of a batch turned out to be before seqs are known.
enum Slot {
    Stored(Appended),
    /// The n-th new message of its conversation in this batch.
    New {
        key: usize,
        nth: i64,
    },
    /// Same (sender, msg_id) as an earlier message of this batch.
    SameAs(usize),
}

async fn commit(pool: &Pool, batch: &[&NewMessage]) -> Result<Vec<Appended>, StoreError> {
    let mut client = Lease::get(pool).await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    let senders: Vec<&str> = batch.iter().map(|m| m.sender.as_str()).collect();
    let ids: Vec<&str> = batch.iter().map(|m| m.msg_id.as_str()).collect();
    let existing: HashMap<(String, String), Appended> = tx
        .query(
            "SELECT m.sender, m.msg_id, m.seq, m.server_time FROM messages m
             JOIN unnest($1::text[], $2::text[]) AS b(sender, msg_id)
               ON m.sender = b.sender AND m.msg_id = b.msg_id",
            &[&senders, &ids],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| {
            let appended = Appended {
                seq: uint(row.cell(2)?),
                server_time: row.cell(3)?,
                duplicate: true,
            };
            Ok(((row.cell(0)?, row.cell(1)?), appended))
        })
        .collect::<Result<_, StoreError>>()?;

    let message_keys: Vec<String> = batch.iter().map(|m| m.conversation.key()).collect();
    let mut keys: Vec<&str> = Vec::new();
    let mut counts: Vec<i64> = Vec::new();
    let mut times: Vec<i64> = Vec::new();
    let mut firsts: Vec<i64> = Vec::new();
    let mut first_seen: HashMap<(&str, &str), usize> = HashMap::new();
    let mut slots = Vec::with_capacity(batch.len());
    for (index, message) in batch.iter().enumerate() {
        let id = (message.sender.as_str(), message.msg_id.as_str());
        if let Some(stored) = existing.get(&(id.0.to_owned(), id.1.to_owned())) {
            slots.push(Slot::Stored(*stored));
            continue;
        }
        if let Some(first) = first_seen.get(&id) {
            slots.push(Slot::SameAs(*first));
            continue;
        }
        first_seen.insert(id, index);
        let message_key = message_keys[index].as_str();
        let key = match keys.iter().position(|k| *k == message_key) {
            Some(key) => key,
            None => {
                keys.push(message_key);
                counts.push(0);
                times.push(0);
                firsts.push(i64::MAX);
                keys.len() - 1
            }
        };
        counts[key] += 1;
        times[key] = times[key].max(message.server_time);
        firsts[key] = firsts[key].min(message.server_time);
        slots.push(Slot::New {
            key,
            nth: counts[key],
        });
    }

    let mut first_seq: HashMap<usize, (i64, i64)> = HashMap::new();
    if !keys.is_empty() {
        create_conversations(&tx, batch, &message_keys, &keys).await?;
        let rows = tx
            .query(
                "UPDATE conversations c
                 SET max_seq = c.max_seq + b.n, last_time = GREATEST(c.last_time, b.t),
                     oldest_time = COALESCE(c.oldest_time, b.first)
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                      AS b(key, n, t, first)
                 WHERE c.key = b.key
                 RETURNING c.key, c.id, c.max_seq",
                &[&keys, &counts, &times, &firsts],
            )
            .await
            .map_err(pg_error)?;
        for row in rows {
            let key: String = row.cell(0)?;
            if let Some(index) = keys.iter().position(|k| *k == key) {
                let max_seq: i64 = row.cell(2)?;
                first_seq.insert(index, (row.cell(1)?, max_seq - counts[index]));
            }
        }
    }

    let mut appended = Vec::with_capacity(batch.len());
    let mut rows = InsertRows::default();
    for (index, slot) in slots.iter().enumerate() {
        let result = match slot {
            Slot::Stored(stored) => *stored,
            Slot::SameAs(first) => Appended {
                duplicate: true,
                ..appended[*first]
            },
            Slot::New { key, nth } => {
                let (conv_id, base) = first_seq
                    .get(key)
                    .copied()
                    .ok_or_else(|| PostgresError::Vanished(keys[*key].to_owned()))?;
                let message = batch[index];
                rows.push(conv_id, base + nth, message);
                Appended {
                    seq: uint(base + nth),
                    server_time: message.server_time,
                    duplicate: false,
                }
            }
        };
        appended.push(result);
    }
    rows.insert(&tx).await?;
    tx.commit().await.map_err(pg_error)?;
    Ok(appended)
}

/// Creates the conversations of `keys` (the distinct keys of new messages) that do not exist
/// yet; a 1:1 chat with its two members. `message_keys` are the batch's keys, message by
/// message.
async fn create_conversations(
    tx: &impl GenericClient,
    batch: &[&NewMessage],
    message_keys: &[String],
    keys: &[&str],
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO conversations (key) SELECT unnest($1::text[]) ON CONFLICT (key) DO NOTHING",
        &[&keys],
    )
    .await
    .map_err(pg_error)?;
    let (mut member_keys, mut uids): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut named = std::collections::HashSet::new();
    for (message, key) in batch.iter().zip(message_keys) {
        if keys.contains(&key.as_str()) && named.insert(key.as_str()) {
            for uid in message.conversation.direct_members().into_iter().flatten() {
                member_keys.push(key);
                uids.push(uid);
            }
        }
    }
    tx.execute(
        "INSERT INTO members (uid, conv_id)
         SELECT b.uid, c.id FROM unnest($1::text[], $2::text[]) AS b(key, uid)
         JOIN conversations c ON c.key = b.key
         ON CONFLICT DO NOTHING",
        &[&member_keys, &uids],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// Columns of the one multi-row insert.
#[derive(Default)]
struct InsertRows<'a> {
    conv_ids: Vec<i64>,
    seqs: Vec<i64>,
    senders: Vec<&'a str>,
    devices: Vec<&'a str>,
    msg_ids: Vec<&'a str>,
    times: Vec<i64>,
    bodies: Vec<&'a [u8]>,
}

impl<'a> InsertRows<'a> {
    fn push(&mut self, conv_id: i64, seq: i64, message: &'a NewMessage) {
        self.conv_ids.push(conv_id);
        self.seqs.push(seq);
        self.senders.push(&message.sender);
        self.devices.push(&message.sender_device);
        self.msg_ids.push(&message.msg_id);
        self.times.push(message.server_time);
        self.bodies.push(&message.body);
    }

    async fn insert(&self, tx: &impl GenericClient) -> Result<(), StoreError> {
        if self.seqs.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO messages (conv_id, seq, sender, sender_device, msg_id, server_time, body)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                                  $6::bigint[], $7::bytea[])",
            &[
                &self.conv_ids,
                &self.seqs,
                &self.senders,
                &self.devices,
                &self.msg_ids,
                &self.times,
                &self.bodies,
            ],
        )
        .await
        .map_err(pg_error)?;
        super::push::enqueue(tx, &self.conv_ids, &self.seqs, &self.senders, &self.times).await
    }
}
