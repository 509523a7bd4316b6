//! The push queue: what each user's pushers are owed per conversation (see the migration).

use deadpool_postgres::GenericClient;

use super::error::Cells;
use super::pg_error;
use crate::domain::{Conversation, Uid};
use crate::store::{PushDue, PushTiming, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// Queues committed messages (conversation ids, seqs, senders, store times, one each) for
/// the members that have a pusher, in the transaction that stores them.
pub(super) async fn enqueue(
    tx: &impl GenericClient,
    conv_ids: &[i64],
    seqs: &[i64],
    senders: &[&str],
    stored_at: &[i64],
) -> Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO push_queue (uid, conv_id, last_seq, pending_since)
         SELECT m.uid, n.conv_id, MAX(n.seq), MIN(n.stored_at)
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[])
              AS n(conv_id, seq, sender, stored_at)
         JOIN members m ON m.conv_id = n.conv_id AND m.uid <> n.sender
         WHERE EXISTS (SELECT 1 FROM pushers p WHERE p.uid = m.uid)
         GROUP BY m.uid, n.conv_id
         ON CONFLICT (uid, conv_id) DO UPDATE SET
           pending_since = CASE WHEN push_queue.last_seq <= push_queue.handled_seq
                           THEN excluded.pending_since ELSE push_queue.pending_since END,
           last_seq = GREATEST(push_queue.last_seq, excluded.last_seq)",
        &[&conv_ids, &seqs, &senders, &stored_at],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn claim(
    c: &impl GenericClient,
    node: &str,
    timing: PushTiming,
    limit: usize,
) -> Result<Vec<PushDue>> {
    let PushTiming {
        now_ms,
        delay_ms,
        coalesce_ms,
        lease_ms,
    } = timing;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    c.query(
        "UPDATE push_queue q SET claimed_by = $1, claimed_until = $2::bigint + $5::bigint,
           sending_seq = CASE WHEN q.sending_seq > q.handled_seq THEN q.sending_seq
                         ELSE q.last_seq END
         FROM (SELECT uid, conv_id FROM push_queue
               WHERE last_seq > handled_seq AND pending_since <= $2::bigint - $3::bigint
                 AND (sent_at = 0 OR sent_at <= $2::bigint - $4::bigint)
                 AND next_at <= $2 AND claimed_until <= $2
               ORDER BY pending_since LIMIT $6 FOR UPDATE SKIP LOCKED) due
         WHERE q.uid = due.uid AND q.conv_id = due.conv_id
         RETURNING q.uid, q.sending_seq, q.attempts,
           (SELECT key FROM conversations c WHERE c.id = q.conv_id)",
        &[&node, &now_ms, &delay_ms, &coalesce_ms, &lease_ms, &limit],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        let key: Option<String> = row.cell(3)?;
        let seq: i64 = row.cell(1)?;
        let attempts: i64 = row.cell(2)?;
        Ok(PushDue {
            uid: row.cell(0)?,
            conversation: key.as_deref().and_then(Conversation::from_key),
            seq: u64::try_from(seq).unwrap_or_default(),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        })
    })
    .collect()
}

/// The row's conversation id: 0 for a counts-only update.
const CONV_ID: &str = "COALESCE((SELECT id FROM conversations WHERE key = $2), 0)";

fn key(due: &PushDue) -> String {
    due.conversation
        .as_ref()
        .map(Conversation::key)
        .unwrap_or_default()
}

fn seq(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) async fn done(
    c: &impl GenericClient,
    due: &PushDue,
    now_ms: i64,
    sent: bool,
) -> Result<()> {
    c.execute(
        &format!(
            "UPDATE push_queue SET handled_seq = GREATEST(handled_seq, $3),
               sent_at = CASE WHEN $5 THEN $4 ELSE sent_at END,
               pending_since = $4, attempts = 0, next_at = 0, claimed_by = '', claimed_until = 0
             WHERE uid = $1 AND conv_id = {CONV_ID}"
        ),
        &[&due.uid.as_str(), &key(due), &seq(due.seq), &now_ms, &sent],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn failed(c: &impl GenericClient, due: &PushDue, retry_at_ms: i64) -> Result<()> {
    c.execute(
        &format!(
            "UPDATE push_queue SET attempts = attempts + 1, next_at = $3, claimed_by = '',
               claimed_until = 0
             WHERE uid = $1 AND conv_id = {CONV_ID}"
        ),
        &[&due.uid.as_str(), &key(due), &retry_at_ms],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn handled(
    c: &impl GenericClient,
    uid: &Uid,
    read: Option<(&Conversation, u64)>,
    now_ms: i64,
) -> Result<()> {
    let uid = uid.as_str();
    match read {
        None => {
            c.execute(
                "UPDATE push_queue SET handled_seq = last_seq
                 WHERE uid = $1 AND conv_id <> 0 AND last_seq > handled_seq",
                &[&uid],
            )
            .await
        }
        Some((conversation, read_seq)) => {
            c.execute(
                &format!(
                    "UPDATE push_queue SET handled_seq = GREATEST(handled_seq, $3)
                     WHERE uid = $1 AND conv_id = {CONV_ID}"
                ),
                &[&uid, &conversation.key(), &seq(read_seq)],
            )
            .await
            .map_err(pg_error)?;
            // The badge moved: a counts-only update for the user's pushers.
            c.execute(
                "INSERT INTO push_queue (uid, conv_id, last_seq, pending_since)
                 SELECT $1, 0, 1, $2 WHERE EXISTS (SELECT 1 FROM pushers WHERE uid = $1)
                 ON CONFLICT (uid, conv_id) DO UPDATE SET
                   pending_since = CASE WHEN push_queue.last_seq > push_queue.handled_seq
                                   THEN push_queue.pending_since ELSE $2 END,
                   last_seq = CASE WHEN push_queue.last_seq > push_queue.handled_seq
                              THEN push_queue.last_seq ELSE push_queue.handled_seq + 1 END",
                &[&uid, &now_ms],
            )
            .await
        }
    }
    .map_err(pg_error)?;
    Ok(())
}

/// Oldest first beyond the newest `keep`; claimed ones are being sent and stay.
pub(super) async fn trim(c: &impl GenericClient, keep: usize, now_ms: i64) -> Result<u64> {
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    c.execute(
        "UPDATE push_queue q SET handled_seq = q.last_seq
         FROM (SELECT uid, conv_id FROM push_queue
               WHERE last_seq > handled_seq AND claimed_until <= $2
               ORDER BY pending_since DESC OFFSET $1) old
         WHERE q.uid = old.uid AND q.conv_id = old.conv_id",
        &[&keep, &now_ms],
    )
    .await
    .map_err(pg_error)
}

pub(super) async fn unread_total(c: &impl GenericClient, uid: &Uid) -> Result<u64> {
    let count: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM members m
             JOIN messages x ON x.conv_id = m.conv_id AND x.seq > m.read_seq
             WHERE m.uid = $1 AND x.sender <> $1",
            &[&uid.as_str()],
        )
        .await
        .map_err(pg_error)?
        .cell(0)?;
    Ok(u64::try_from(count).unwrap_or_default())
}
