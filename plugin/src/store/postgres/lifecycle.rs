//! What keeps the PostgreSQL store bounded, mirroring the embedded backend: retention, device
//! expiry, forgetting devices, erasing users and the eviction log.

use crate::domain::Uid;
use deadpool_postgres::GenericClient;

use super::error::Cells;
use super::{int, pg_error, uint};
use crate::store::{
    Collected, ConversationKind, Device, DeviceInfo, Erased, Eviction, GroupErasure, StoreError,
};

type Result<T> = std::result::Result<T, StoreError>;

/// Messages one conversation gives up per step at most, so that a conversation with a long
/// due backlog cannot make a step large; it stays first in line for the next one.
const ROWS_PER_CONVERSATION: i64 = 64;

/// Deletes about `batch` of the oldest messages of `kind` stored before `cutoff`, as a
/// prefix of each conversation they belong to. Due conversations are found by the time of
/// their oldest stored message, and each is read by its primary key from above its previous
/// deletion, so a step never walks the dead rows earlier steps left for vacuum. A
/// conversation being appended to, or collected by another node, is skipped until the next
/// step: garbage collection never waits for a lock.
pub(super) async fn expire_messages(
    c: &impl GenericClient,
    kind: ConversationKind,
    cutoff: i64,
    batch: usize,
) -> Result<Collected> {
    let row = c
        .query_one(
            "WITH due AS (
                 SELECT id, gone_seq, oldest_time FROM conversations
                 WHERE kind = $1 AND oldest_time < $2
                 ORDER BY oldest_time LIMIT $3
                 FOR UPDATE SKIP LOCKED),
             counted AS (
                 SELECT d.id, d.gone_seq AS before, COALESCE(x.upto, d.gone_seq) AS upto,
                        COALESCE(x.n, 0) AS n, x.oldest,
                        SUM(COALESCE(x.n, 0)) OVER (ORDER BY d.oldest_time, d.id) AS running
                 FROM due d CROSS JOIN LATERAL (
                     SELECT MAX(s.seq) AS upto, COUNT(*) AS n, MIN(s.server_time) AS oldest
                     FROM (SELECT seq, server_time FROM messages
                           WHERE conv_id = d.id AND seq > d.gone_seq
                           ORDER BY seq LIMIT $4) s
                     WHERE s.server_time < $2) x),
             cut AS (SELECT * FROM counted WHERE running - n < $3),
             moved AS (
                 UPDATE conversations c
                 SET gone_seq = cut.upto,
                     oldest_time = COALESCE(
                         (SELECT m.server_time FROM messages m
                          WHERE m.conv_id = c.id AND m.seq > cut.upto ORDER BY m.seq LIMIT 1),
                         CASE WHEN c.max_seq > cut.upto THEN c.last_time END)
                 FROM cut WHERE c.id = cut.id),
             gone AS (
                 DELETE FROM messages m USING cut
                 WHERE m.conv_id = cut.id AND m.seq > cut.before AND m.seq <= cut.upto
                 RETURNING 1)
             SELECT (SELECT COUNT(*) FROM gone),
                    COALESCE((SELECT MIN(oldest) FROM cut), $2),
                    (SELECT COUNT(*) FROM due),
                    (SELECT COUNT(*) FROM cut),
                    (SELECT COUNT(*) FROM cut WHERE n >= $4)",
            &[
                &kind.code(),
                &cutoff,
                &int(batch as u64),
                &ROWS_PER_CONVERSATION,
            ],
        )
        .await
        .map_err(pg_error)?;
    let oldest: i64 = row.cell(1)?;
    let (due, cut, capped): (i64, i64, i64) = (row.cell(2)?, row.cell(3)?, row.cell(4)?);
    Ok(Collected {
        messages: uint(row.cell(0)?),
        devices: 0,
        behind_ms: cutoff.saturating_sub(oldest),
        // A full list of due conversations, one cut short by the row budget, or a
        // conversation that gave up all it may in one step.
        more: due >= int(batch as u64) || cut < due || capped > 0,
    })
}

/// The devices last seen before `cutoff`, at most `batch`, oldest first.
pub(super) async fn expired_devices(
    c: &impl GenericClient,
    cutoff: i64,
    batch: usize,
) -> Result<Vec<Device>> {
    let sql = "SELECT uid, client_id FROM devices WHERE last_seen < $1 ORDER BY last_seen LIMIT $2";
    device_rows(c, sql, &[&cutoff, &int(batch as u64)]).await
}

/// The devices `sql` selects as `(uid, client_id)` rows.
async fn device_rows(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Device>> {
    c.query(sql, params)
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| {
            Ok(Device {
                uid: row.cell(0)?,
                client_id: row.cell(1)?,
            })
        })
        .collect()
}

/// Deletes at most `batch` entries of each log (removals, evictions) logged before `cutoff`.
pub(super) async fn prune_logs(
    c: &impl GenericClient,
    cutoff: i64,
    batch: usize,
) -> Result<Collected> {
    let mut more = false;
    for log in ["member_removals", "evictions"] {
        let deleted = c
            .execute(
                &format!(
                    "DELETE FROM {log} WHERE id IN
                       (SELECT id FROM {log} WHERE logged_at < $1 ORDER BY id LIMIT $2)"
                ),
                &[&cutoff, &int(batch as u64)],
            )
            .await
            .map_err(pg_error)?;
        more |= deleted >= batch as u64;
    }
    Ok(Collected {
        more,
        ..Collected::default()
    })
}

/// Deletes the state of `devices`; how many of them were known.
pub(super) async fn forget_devices(c: &impl GenericClient, devices: &[Device]) -> Result<u64> {
    let uids: Vec<&str> = devices.iter().map(|d| d.uid.as_str()).collect();
    let clients: Vec<&str> = devices.iter().map(|d| d.client_id.as_str()).collect();
    let mut known = 0;
    for table in crate::store::DEVICE_TABLES {
        let deleted = c
            .execute(
                &format!(
                    "DELETE FROM {table} t USING unnest($1::text[], $2::text[]) AS d(uid, client_id)
                     WHERE t.uid = d.uid AND t.client_id = d.client_id"
                ),
                &[&uids, &clients],
            )
            .await
            .map_err(pg_error)?;
        if table == "devices" {
            known = deleted;
        }
    }
    Ok(known)
}

pub(super) async fn touch_devices(
    c: &impl GenericClient,
    devices: &[Device],
    now_ms: i64,
) -> Result<()> {
    let uids: Vec<&str> = devices.iter().map(|d| d.uid.as_str()).collect();
    let clients: Vec<&str> = devices.iter().map(|d| d.client_id.as_str()).collect();
    c.execute(
        "UPDATE devices t SET last_seen = $3
         FROM unnest($1::text[], $2::text[]) AS d(uid, client_id)
         WHERE t.uid = d.uid AND t.client_id = d.client_id",
        &[&uids, &clients, &now_ms],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn devices(c: &impl GenericClient, uid: &Uid) -> Result<Vec<DeviceInfo>> {
    c.query(
        "SELECT client_id, last_seen FROM devices WHERE uid = $1 ORDER BY client_id",
        &[&uid],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        Ok(DeviceInfo {
            client_id: row.cell(0)?,
            last_seen: row.cell(1)?,
        })
    })
    .collect()
}

pub(super) async fn evict(
    c: &impl GenericClient,
    uid: &Uid,
    client_id: Option<&str>,
) -> Result<()> {
    c.execute(
        "INSERT INTO evictions (uid, client_id) VALUES ($1, $2)",
        &[&uid, &client_id.unwrap_or_default()],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn evictions_since(
    c: &impl GenericClient,
    after: u64,
    limit: usize,
) -> Result<Vec<Eviction>> {
    c.query(
        "SELECT id, uid, client_id FROM evictions WHERE id > $1 ORDER BY id LIMIT $2",
        &[&int(after), &int(limit as u64)],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        let client_id: String = row.cell(2)?;
        Ok(Eviction {
            id: uint(row.cell(0)?),
            uid: row.cell(1)?,
            client_id: (!client_id.is_empty()).then_some(client_id),
        })
    })
    .collect()
}

/// Runs `sql` with the user's uid and returns how many rows it changed.
async fn run(c: &impl GenericClient, sql: &str, uid: &Uid) -> Result<u64> {
    c.execute(sql, &[&uid]).await.map_err(pg_error)
}

/// Erases a user (see [`crate::store::Store::erase_user`]); returns what it removed, and for
/// the cache the devices it forgot and the conversations whose messages changed, each with
/// its members.
pub(super) async fn erase_user(
    c: &impl GenericClient,
    uid: &Uid,
    groups: GroupErasure,
) -> Result<(Erased, Vec<Device>, Vec<(String, Vec<String>)>)> {
    let mut erased = Erased::default();
    // The conversations whose messages change, with their members, in one round trip.
    let touched: Vec<(String, Vec<String>)> = c
        .query(
            "SELECT c.key, array_agg(mb.uid) FROM conversations c
             JOIN members mb ON mb.conv_id = c.id
             WHERE c.id IN (SELECT DISTINCT conv_id FROM messages WHERE sender = $1)
             GROUP BY c.key",
            &[&uid],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| Ok((row.cell(0)?, row.cell(1)?)))
        .collect::<Result<_>>()?;
    let sql = "SELECT uid, client_id FROM devices WHERE uid = $1";
    let mine = device_rows(c, sql, &[&uid]).await?;
    erased.devices = forget_devices(c, &mine).await?;
    erased.messages_deleted += run(
        c,
        "DELETE FROM messages m USING conversations c
         WHERE m.sender = $1 AND m.conv_id = c.id AND c.kind = 0",
        uid,
    )
    .await?;
    if groups == GroupErasure::Delete {
        erased.messages_deleted += run(
            c,
            "DELETE FROM messages m USING conversations c
             WHERE m.sender = $1 AND m.conv_id = c.id AND c.kind = 1",
            uid,
        )
        .await?;
    }
    erased.messages_redacted += run(
        c,
        "UPDATE messages m SET body = ''::bytea, sender_device = '',
                msg_id = 'erased:' || m.conv_id || ':' || m.seq
         FROM conversations c
         WHERE m.sender = $1 AND m.conv_id = c.id AND c.kind = 1
           AND m.msg_id NOT LIKE 'erased:%'",
        uid,
    )
    .await?;
    run(
        c,
        "INSERT INTO member_removals (conv_key, uid)
         SELECT c.key, m.uid FROM members m JOIN conversations c ON c.id = m.conv_id
         WHERE m.uid = $1 AND c.kind = 1",
        uid,
    )
    .await?;
    let owned: Vec<i64> = c
        .query(
            "SELECT m.conv_id FROM members m JOIN conversations c ON c.id = m.conv_id
             WHERE m.uid = $1 AND c.kind = 1 AND m.role = 3",
            &[&uid],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| row.cell(0))
        .collect::<Result<_>>()?;
    erased.groups = run(
        c,
        "DELETE FROM members WHERE uid = $1
           AND conv_id IN (SELECT id FROM conversations WHERE kind = 1)",
        uid,
    )
    .await?;
    c.execute(
        "UPDATE members SET role = 3 WHERE (conv_id, uid) IN
           (SELECT DISTINCT ON (conv_id) conv_id, uid FROM members WHERE conv_id = ANY($1)
            ORDER BY conv_id, role DESC, joined_seq, uid)",
        &[&owned],
    )
    .await
    .map_err(pg_error)?;
    run(c, "UPDATE members SET read_seq = 0 WHERE uid = $1", uid).await?;
    evict(c, uid, None).await?;
    Ok((erased, mine, touched))
}
