//! The SQL of the PostgreSQL backend other than appends, mirroring the embedded backend.

use crate::domain::Uid;
use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::cache::{Counted, DigestCache};
use super::error::Cells;
use super::{int, pg_error, uint};
use crate::store::ranges::{self, SeqRange};
use crate::store::{
    Conversation, ConversationState, Device, DigestEntry, DigestShape, Page, Skipped, StoreError,
    StoredMessage,
};

type Result<T> = std::result::Result<T, StoreError>;

/// A conversation's stored key reads back as the [`Conversation`] it was written from.
impl<'a> tokio_postgres::types::FromSql<'a> for Conversation {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let key = <&str as tokio_postgres::types::FromSql>::from_sql(ty, raw)?;
        Conversation::from_key(key).ok_or_else(|| format!("not a conversation key: {key:?}").into())
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::FromSql>::accepts(ty)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ConversationRow {
    pub(super) id: i64,
    pub(super) max_seq: u64,
    pub(super) last_time: i64,
    /// Every seq up to this one was deleted by retention.
    pub(super) gone_seq: u64,
}

pub(super) async fn conversation(
    c: &impl GenericClient,
    key: &str,
) -> Result<Option<ConversationRow>> {
    let row = c
        .query_opt(
            "SELECT id, max_seq, last_time, gone_seq FROM conversations WHERE key = $1",
            &[&key],
        )
        .await
        .map_err(pg_error)?;
    row.map(|row| {
        Ok::<_, StoreError>(ConversationRow {
            id: row.cell(0)?,
            max_seq: uint(row.cell(1)?),
            last_time: row.cell(2)?,
            gone_seq: uint(row.cell(3)?),
        })
    })
    .transpose()
}

pub(super) async fn register_device(
    c: &impl GenericClient,
    device: &Device,
    now_ms: i64,
) -> Result<()> {
    let seen = c
        .execute(
            "UPDATE devices SET last_seen = $3 WHERE uid = $1 AND client_id = $2",
            &[&device.uid, &device.client_id, &now_ms],
        )
        .await
        .map_err(pg_error)?;
    if seen > 0 {
        return Ok(());
    }
    let inserted = c
        .execute(
            "INSERT INTO devices (uid, client_id, last_seen) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&device.uid, &device.client_id, &now_ms],
        )
        .await
        .map_err(pg_error)?;
    if inserted == 0 {
        return Ok(());
    }
    let rows = c
        .query(
            "SELECT conv_id, lo, hi FROM acked WHERE uid = $1 AND client_id != $2
             ORDER BY conv_id, lo",
            &[&device.uid, &device.client_id],
        )
        .await
        .map_err(pg_error)?;
    let rows = rows
        .iter()
        .map(|row| {
            let range = SeqRange {
                lo: uint(row.cell(1)?),
                hi: uint(row.cell(2)?),
            };
            Ok((row.cell::<i64>(0)?, range))
        })
        .collect::<Result<Vec<_>>>()?;
    for (conv_id, ranges) in ranges::union_by_conversation(rows) {
        save_acked(c, device, conv_id, &ranges).await?;
    }
    Ok(())
}

/// The device's acknowledged ranges of a conversation; what was sent before its user joined
/// counts as acknowledged.
async fn acked(c: &impl GenericClient, device: &Device, conv_id: i64) -> Result<Vec<SeqRange>> {
    let rows = c
        .query(
            "SELECT lo, hi FROM acked WHERE uid = $1 AND client_id = $2 AND conv_id = $3
             UNION ALL
             SELECT 1, joined_seq FROM members WHERE uid = $1 AND conv_id = $3 AND joined_seq > 0",
            &[&device.uid, &device.client_id, &conv_id],
        )
        .await
        .map_err(pg_error)?;
    Ok(ranges::normalized(
        rows.iter()
            .map(|row| {
                Ok(SeqRange {
                    lo: uint(row.cell(0)?),
                    hi: uint(row.cell(1)?),
                })
            })
            .collect::<Result<Vec<_>>>()?,
    ))
}

async fn save_acked(
    c: &impl GenericClient,
    device: &Device,
    conv_id: i64,
    ranges: &[SeqRange],
) -> Result<()> {
    c.execute(
        "DELETE FROM acked WHERE uid = $1 AND client_id = $2 AND conv_id = $3",
        &[&device.uid, &device.client_id, &conv_id],
    )
    .await
    .map_err(pg_error)?;
    let los: Vec<i64> = ranges.iter().map(|r| int(r.lo)).collect();
    let his: Vec<i64> = ranges.iter().map(|r| int(r.hi)).collect();
    c.execute(
        "INSERT INTO acked (uid, client_id, conv_id, lo, hi)
         SELECT $1, $2, $3, lo, hi FROM unnest($4::bigint[], $5::bigint[]) AS r(lo, hi)",
        &[&device.uid, &device.client_id, &conv_id, &los, &his],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn ack(
    c: &impl GenericClient,
    device: &Device,
    key: &str,
    range: SeqRange,
) -> Result<u64> {
    let conv = conversation(c, key)
        .await?
        .ok_or_else(StoreError::no_messages)?;
    let clamped = ranges::clamped_ack(range, conv.max_seq)?;
    let merged = ranges::insert(&acked(c, device, conv.id).await?, clamped);
    save_acked(c, device, conv.id, &merged).await?;
    Ok(clamped.hi)
}

fn stored(row: &Row) -> Result<StoredMessage> {
    Ok(StoredMessage {
        seq: uint(row.cell(0)?),
        sender: row.cell(1)?,
        server_time: row.cell(2)?,
        body: row.cell(3)?,
    })
}

fn nothing_left() -> Page {
    Page {
        end: true,
        ..Page::default()
    }
}

pub(super) async fn pull(
    c: &impl GenericClient,
    device: &Device,
    key: &str,
    ack: Option<SeqRange>,
    limit: usize,
) -> Result<Page> {
    let Some(conv) = conversation(c, key).await? else {
        return match ack {
            Some(range) => Err(StoreError::past_end(range.lo, 0)),
            None => Ok(nothing_left()),
        };
    };
    let mut done = acked(c, device, conv.id).await?;
    if let Some(range) = ack {
        done = ranges::insert(&done, ranges::clamped_ack(range, conv.max_seq)?);
    }
    let gone = ranges::uncovered(&done, conv.gone_seq);
    done = ranges::with_gone(&done, conv.gone_seq);
    if ack.is_some() || gone > 0 {
        save_acked(c, device, conv.id, &done).await?;
    }
    let mut messages = Vec::with_capacity(limit + 1);
    // Gaps are read from the top in windows a few pages wide, so that no query can touch more
    // rows than that whatever plan PostgreSQL picks (on a freshly loaded table without
    // statistics it read the whole gap and sorted it: 11 ms instead of 0.1 ms at 1,000,000).
    let window = (limit as u64 + 1) * 4;
    'gaps: for gap in ranges::gaps_newest_first(&done, conv.max_seq) {
        let mut hi = gap.hi;
        loop {
            let lo = gap.lo.max(hi.saturating_sub(window - 1));
            let wanted = int((limit + 1 - messages.len()) as u64);
            let rows = c
                .query(
                    "SELECT seq, sender, server_time, body FROM messages
                     WHERE conv_id = $1 AND seq BETWEEN $2 AND $3
                       AND NOT (sender = $4 AND sender_device = $5)
                     ORDER BY seq DESC LIMIT $6",
                    &[
                        &conv.id,
                        &int(lo),
                        &int(hi),
                        &device.uid,
                        &device.client_id,
                        &wanted,
                    ],
                )
                .await
                .map_err(pg_error)?;
            for row in &rows {
                messages.push(stored(row)?);
            }
            if messages.len() > limit {
                break 'gaps;
            }
            if lo == gap.lo {
                break;
            }
            hi = lo - 1;
        }
    }
    let end = messages.len() <= limit;
    messages.truncate(limit);
    Ok(Page {
        messages,
        end,
        gone,
    })
}

pub(super) async fn history(
    c: &impl GenericClient,
    key: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Page> {
    let Some(conv) = conversation(c, key).await? else {
        return Ok(nothing_left());
    };
    let before = before.unwrap_or(u64::MAX).min(conv.max_seq + 1);
    let rows = c
        .query(
            "SELECT seq, sender, server_time, body FROM messages
             WHERE conv_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            &[&conv.id, &int(before), &int(limit as u64 + 1)],
        )
        .await
        .map_err(pg_error)?;
    let mut messages = rows.iter().map(stored).collect::<Result<Vec<_>>>()?;
    let end = messages.len() <= limit;
    messages.truncate(limit);
    Ok(Page {
        messages,
        end,
        gone: 0,
    })
}

pub(super) async fn mark_read(
    c: &impl GenericClient,
    uid: &Uid,
    key: &str,
    seq: u64,
) -> Result<(u64, u64)> {
    let conv = conversation(c, key)
        .await?
        .ok_or_else(StoreError::no_messages)?;
    if seq > conv.max_seq {
        return Err(StoreError::past_end(seq, conv.max_seq));
    }
    let row = c
        .query_opt(
            "UPDATE members m SET read_seq = GREATEST(m.read_seq, $3)
             FROM (SELECT read_seq FROM members WHERE uid = $1 AND conv_id = $2 FOR UPDATE) old
             WHERE m.uid = $1 AND m.conv_id = $2
             RETURNING old.read_seq, m.read_seq",
            &[&uid, &conv.id, &int(seq)],
        )
        .await
        .map_err(pg_error)?;
    row.map(|row| Ok::<_, StoreError>((uint(row.cell(0)?), uint(row.cell(1)?))))
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("{uid} is not a member of the conversation")))
}

/// A conversation the device's user belongs to.
#[derive(Debug)]
struct Membership {
    conv: ConversationRow,
    conversation: Conversation,
    key: String,
    read_seq: u64,
}

async fn memberships(c: &impl GenericClient, uid: &Uid) -> Result<Vec<Membership>> {
    let rows = c
        .query(
            "SELECT c.id, c.max_seq, c.last_time, c.gone_seq, c.key, m.read_seq
             FROM members m JOIN conversations c ON c.id = m.conv_id WHERE m.uid = $1
             ORDER BY c.key",
            &[&uid],
        )
        .await
        .map_err(pg_error)?;
    rows.iter()
        .map(|row| {
            Ok(Membership {
                conv: ConversationRow {
                    id: row.cell(0)?,
                    max_seq: uint(row.cell(1)?),
                    last_time: row.cell(2)?,
                    gone_seq: uint(row.cell(3)?),
                },
                conversation: row.cell(4)?,
                key: row.cell(4)?,
                read_seq: uint(row.cell(5)?),
            })
        })
        .collect::<Result<_>>()
}

/// Every digest entry of a device in a handful of set-based queries, whatever the number of
/// conversations (one round trip per conversation made a 1,000-conversation digest take
/// over a second). With a cache, counters and previews still valid in Redis are not read
/// from PostgreSQL, and what had to be read is written back. Each entry comes with the state
/// its counters were counted against, for [`DigestCache::record_digest`].
pub(super) async fn digest_states(
    c: &impl GenericClient,
    device: &Device,
    shape: DigestShape,
    cache: Option<&DigestCache>,
) -> Result<Vec<(ConversationState, Counted)>> {
    let members = memberships(c, &device.uid).await?;
    let mut acked = acked_by_conversation(c, device).await?;
    let cleared = cleared_floors(c, device).await?;
    // Retention's deleted prefix counts as acknowledged, then the cap skips what it skips.
    let mut cuts: Vec<(i64, Vec<SeqRange>, Skipped)> = Vec::new();
    for member in &members {
        let ranges = acked.entry(member.conv.id).or_default();
        *ranges = ranges::with_gone(ranges, member.conv.gone_seq);
        let max = member.conv.max_seq;
        if let Some(skip) = ranges::backlog_cut(ranges, max, shape.max_backlog) {
            if let Some(cut) = SeqRange::new(1, skip.upto) {
                cuts.push((member.conv.id, ranges.clone(), skip));
                *ranges = ranges::insert(ranges, cut);
            }
        }
    }
    let floor_of = |id: i64| cleared.get(&id).copied().unwrap_or_default();
    let skips = skipped_messages(c, device, &cuts, &floor_of).await?;
    let no_ranges: Vec<SeqRange> = Vec::new();
    let ranges_of = |id: i64| acked.get(&id).unwrap_or(&no_ranges);
    let states: Vec<Counted> = members
        .iter()
        .map(|member| Counted {
            max_seq: member.conv.max_seq,
            floor: floor_of(member.conv.id).seq,
            acked: ranges::total(ranges_of(member.conv.id)),
            count: 0,
            unacked: 0,
        })
        .collect();
    let keyed: Vec<(&str, Counted)> = members
        .iter()
        .zip(&states)
        .map(|(member, state)| (member.key.as_str(), *state))
        .collect();
    let mut counted: Vec<Option<Counted>> = match cache {
        Some(cache) => cache.counters(device, &keyed).await,
        None => vec![None; members.len()],
    };
    let recount: Vec<usize> = (0..members.len())
        .filter(|i| counted[*i].is_none())
        .collect();
    let recounted = count_unacked(
        c,
        device,
        recount.iter().map(|i| {
            let member = &members[*i];
            (member.conv.id, ranges_of(member.conv.id), states[*i])
        }),
    )
    .await?;
    let mut saved = Vec::with_capacity(recount.len());
    for i in recount {
        let (unacked, count) = recounted
            .get(&members[i].conv.id)
            .copied()
            .unwrap_or_default();
        let fresh = Counted {
            count,
            unacked,
            ..states[i]
        };
        counted[i] = Some(fresh);
        saved.push((members[i].key.as_str(), fresh));
    }
    if let Some(cache) = cache {
        cache.save_counters(device, &saved).await;
    }
    let all: Vec<i64> = members.iter().map(|m| m.conv.id).collect();
    let peers = peer_read_seqs(c, device, &all).await?;
    let seen = reads_seen(c, device).await?;
    let peer_of = |id: i64| uint(peers.get(&id).copied().unwrap_or(0));
    let listed: Vec<(&Membership, Counted)> = members
        .iter()
        .zip(counted)
        .filter_map(|(member, counted)| counted.map(|counted| (member, counted)))
        .filter(|(member, counted)| {
            let id = member.conv.id;
            counted.unacked > 0
                || counted.count > 0
                || floor_of(id).missed_total + skips.get(&id).map_or(0, |s| s.count)
                    > floor_of(id).missed_cleared
                || peer_of(id) > seen.get(&id).map_or(0, |s| s.0)
                || member.read_seq > seen.get(&id).map_or(0, |s| s.1)
        })
        .collect();
    let mut previews = previews(c, &listed, shape.last_n, cache).await?;
    Ok(listed
        .into_iter()
        .zip(previews.iter_mut())
        .map(|((member, counted), last)| {
            let id = member.conv.id;
            let skipped = skips.get(&id).copied();
            let floor = floor_of(id);
            let missed_total = floor.missed_total + skipped.map_or(0, |s| s.count);
            let state = ConversationState {
                conversation: member.conversation.clone(),
                count: counted.count,
                unacked: counted.unacked,
                max_seq: member.conv.max_seq,
                last_time: member.conv.last_time,
                acked_seq: ranges::watermark(ranges_of(id)),
                read_seq: member.read_seq,
                peer_read_seq: peer_of(id),
                last: std::mem::take(last),
                missed: missed_total.saturating_sub(floor.missed_cleared),
                skipped,
                missed_total,
            };
            (state, counted)
        })
        .collect())
}

async fn acked_by_conversation(
    c: &impl GenericClient,
    device: &Device,
) -> Result<HashMap<i64, Vec<SeqRange>>> {
    let rows = c
        .query(
            "SELECT conv_id, lo, hi FROM acked WHERE uid = $1 AND client_id = $2
             UNION ALL
             SELECT conv_id, 1, joined_seq FROM members WHERE uid = $1 AND joined_seq > 0
             ORDER BY 1, 2",
            &[&device.uid, &device.client_id],
        )
        .await
        .map_err(pg_error)?;
    let merged = ranges::union_by_conversation(
        rows.iter()
            .map(|row| {
                let range = SeqRange {
                    lo: uint(row.cell(1)?),
                    hi: uint(row.cell(2)?),
                };
                Ok((row.cell(0)?, range))
            })
            .collect::<Result<Vec<_>>>()?,
    );
    Ok(merged.into_iter().collect())
}

/// What each backlog cut skips, counted in messages not sent by this device (as `unacked`
/// counts): `cuts` holds each conversation's acknowledged ranges before its cut.
async fn skipped_messages(
    c: &impl GenericClient,
    device: &Device,
    cuts: &[(i64, Vec<SeqRange>, Skipped)],
    floor_of: &impl Fn(i64) -> Cleared,
) -> Result<HashMap<i64, Skipped>> {
    if cuts.is_empty() {
        return Ok(HashMap::new());
    }
    let below_cut = cuts.iter().map(|(id, ranges, cut)| {
        let state = Counted {
            max_seq: cut.upto,
            floor: floor_of(*id).seq,
            ..Counted::default()
        };
        (*id, ranges, state)
    });
    let counted = count_unacked(c, device, below_cut).await?;
    Ok(cuts
        .iter()
        .map(|(id, _, cut)| {
            let count = counted.get(id).map_or(0, |(unacked, _)| *unacked);
            (*id, Skipped { count, ..*cut })
        })
        .collect())
}

/// A device's cleared state of one conversation.
#[derive(Debug, Clone, Copy, Default)]
struct Cleared {
    /// Counters count only seqs above it.
    seq: u64,
    /// Messages a backlog cap ever skipped for the device.
    missed_total: u64,
    /// How many of them a cleared digest reported.
    missed_cleared: u64,
}

async fn cleared_floors(c: &impl GenericClient, device: &Device) -> Result<HashMap<i64, Cleared>> {
    c.query(
        "SELECT conv_id, cleared_seq, missed, missed_cleared FROM cleared
         WHERE uid = $1 AND client_id = $2",
        &[&device.uid, &device.client_id],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        let cleared = Cleared {
            seq: uint(row.cell(1)?),
            missed_total: uint(row.cell(2)?),
            missed_cleared: uint(row.cell(3)?),
        };
        Ok((row.cell(0)?, cleared))
    })
    .collect::<Result<_>>()
}

/// Per conversation `(unacked, count)`: messages in the device's unacked gaps not sent by
/// this device, and those of them from others above the cleared floor.
async fn count_unacked<'a>(
    c: &impl GenericClient,
    device: &Device,
    conversations: impl Iterator<Item = (i64, &'a Vec<SeqRange>, Counted)>,
) -> Result<HashMap<i64, (u64, u64)>> {
    let (mut gap_convs, mut los, mut his, mut floors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, acked, state) in conversations {
        for gap in ranges::gaps_newest_first(acked, state.max_seq) {
            gap_convs.push(id);
            los.push(int(gap.lo));
            his.push(int(gap.hi));
            floors.push(int(state.floor));
        }
    }
    if gap_convs.is_empty() {
        return Ok(HashMap::new());
    }
    c.query(
        "SELECT g.conv,
                    COUNT(*) FILTER (WHERE NOT (m.sender = $5 AND m.sender_device = $6)),
                    COUNT(*) FILTER (WHERE m.sender != $5 AND m.seq > g.floor)
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
                  AS g(conv, lo, hi, floor)
             JOIN messages m ON m.conv_id = g.conv AND m.seq BETWEEN g.lo AND g.hi
             GROUP BY g.conv",
        &[
            &gap_convs,
            &los,
            &his,
            &floors,
            &device.uid,
            &device.client_id,
        ],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| Ok((row.cell(0)?, (uint(row.cell(1)?), uint(row.cell(2)?)))))
    .collect::<Result<_>>()
}

/// The others' and the user's own read cursor each conversation's last digest reported to
/// the device.
async fn reads_seen(c: &impl GenericClient, device: &Device) -> Result<HashMap<i64, (u64, u64)>> {
    c.query(
        "SELECT conv_id, peer_read_seq, read_seq FROM read_seen WHERE uid = $1 AND client_id = $2",
        &[&device.uid, &device.client_id],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| Ok((row.cell(0)?, (uint(row.cell(1)?), uint(row.cell(2)?)))))
    .collect::<Result<_>>()
}

/// Highest read cursor of the other members, per conversation.
async fn peer_read_seqs(
    c: &impl GenericClient,
    device: &Device,
    ids: &[i64],
) -> Result<HashMap<i64, i64>> {
    c.query(
        "SELECT conv_id, MAX(read_seq) FROM members WHERE conv_id = ANY($1) AND uid != $2
             GROUP BY conv_id",
        &[&ids, &device.uid],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| Ok((row.cell(0)?, row.cell(1)?)))
    .collect::<Result<_>>()
}

/// The newest `last_n` messages of each listed conversation (in order), from the cache where
/// it holds exactly those, else from PostgreSQL (and then cached).
async fn previews(
    c: &impl GenericClient,
    listed: &[(&Membership, Counted)],
    last_n: usize,
    cache: Option<&DigestCache>,
) -> Result<Vec<Vec<StoredMessage>>> {
    let wanted: Vec<(&str, u64)> = listed
        .iter()
        .map(|(m, _)| (m.key.as_str(), m.conv.max_seq))
        .collect();
    let cached = match cache {
        Some(cache) => cache.previews(&wanted, last_n).await,
        None => vec![None; listed.len()],
    };
    let missing: Vec<i64> = listed
        .iter()
        .zip(&cached)
        .filter(|(_, cached)| cached.is_none())
        .map(|((m, _), _)| m.conv.id)
        .collect();
    let mut read: HashMap<i64, Vec<StoredMessage>> = HashMap::new();
    if !missing.is_empty() && last_n > 0 {
        for row in c
            .query(
                "SELECT c.id, m.seq, m.sender, m.server_time, m.body
                 FROM unnest($1::bigint[]) AS c(id)
                 CROSS JOIN LATERAL (SELECT seq, sender, server_time, body FROM messages
                                     WHERE conv_id = c.id ORDER BY seq DESC LIMIT $2) m
                 ORDER BY c.id, m.seq DESC",
                &[&missing, &int(last_n as u64)],
            )
            .await
            .map_err(pg_error)?
        {
            read.entry(row.cell(0)?).or_default().push(StoredMessage {
                seq: uint(row.cell(1)?),
                sender: row.cell(2)?,
                server_time: row.cell(3)?,
                body: row.cell(4)?,
            });
        }
    }
    let previews: Vec<Vec<StoredMessage>> = listed
        .iter()
        .zip(cached)
        .map(|((m, _), cached)| {
            let mut last =
                cached.unwrap_or_else(|| read.get(&m.conv.id).cloned().unwrap_or_default());
            // Cached previews may predate retention's last deletion.
            last.retain(|message| message.seq > m.conv.gone_seq);
            last
        })
        .collect();
    if let Some(cache) = cache {
        let fresh: Vec<(&str, &[StoredMessage])> = listed
            .iter()
            .zip(&previews)
            .filter(|((m, _), _)| read.contains_key(&m.conv.id))
            .map(|((m, _), p)| (m.key.as_str(), p.as_slice()))
            .collect();
        cache.save_previews(&fresh).await;
    }
    Ok(previews)
}

pub(super) async fn record_digest(
    c: &impl GenericClient,
    device: &Device,
    entries: &[DigestEntry],
    now_ms: i64,
) -> Result<u64> {
    let version: i64 = c
        .query_one(
            "INSERT INTO devices (uid, client_id, digest_version, last_seen) VALUES ($1, $2, 1, $3)
             ON CONFLICT (uid, client_id)
             DO UPDATE SET digest_version = devices.digest_version + 1,
                           last_seen = excluded.last_seen
             RETURNING digest_version",
            &[&device.uid, &device.client_id, &now_ms],
        )
        .await
        .map_err(pg_error)?
        .cell(0)?;
    let keys: Vec<String> = entries.iter().map(|e| e.conversation.key()).collect();
    let seqs: Vec<i64> = entries.iter().map(|e| int(e.max_seq)).collect();
    let reads: Vec<i64> = entries.iter().map(|e| int(e.peer_read_seq)).collect();
    let own_reads: Vec<i64> = entries.iter().map(|e| int(e.read_seq)).collect();
    let missed: Vec<i64> = entries.iter().map(|e| int(e.missed_total)).collect();
    c.execute(
        "INSERT INTO read_seen (uid, client_id, conv_id, peer_read_seq, read_seq)
         SELECT $1, $2, c.id, e.read, e.own
         FROM unnest($3::text[], $4::bigint[], $5::bigint[]) AS e(key, read, own)
         JOIN conversations c ON c.key = e.key
         ON CONFLICT (uid, client_id, conv_id) DO UPDATE
         SET peer_read_seq = excluded.peer_read_seq, read_seq = excluded.read_seq",
        &[&device.uid, &device.client_id, &keys, &reads, &own_reads],
    )
    .await
    .map_err(pg_error)?;
    c.execute(
        "INSERT INTO digest_entries (uid, client_id, version, conv_id, max_seq, missed)
         SELECT $1, $2, $3, c.id, e.max_seq, e.missed
         FROM unnest($4::text[], $5::bigint[], $6::bigint[]) AS e(key, max_seq, missed)
         JOIN conversations c ON c.key = e.key",
        &[
            &device.uid,
            &device.client_id,
            &version,
            &keys,
            &seqs,
            &missed,
        ],
    )
    .await
    .map_err(pg_error)?;
    for entry in entries {
        if let Some(skipped) = entry.skipped {
            skip_backlog(c, device, &entry.conversation.key(), skipped).await?;
        }
    }
    c.execute(
        "DELETE FROM digest_entries WHERE uid = $1 AND client_id = $2 AND version + 8 < $3",
        &[&device.uid, &device.client_id, &version],
    )
    .await
    .map_err(pg_error)?;
    Ok(uint(version))
}

/// Records what a backlog cap skipped: acknowledged for the device, and missed until cleared.
async fn skip_backlog(
    c: &impl GenericClient,
    device: &Device,
    key: &str,
    skipped: Skipped,
) -> Result<()> {
    let (Some(conv), Some(cut)) = (conversation(c, key).await?, SeqRange::new(1, skipped.upto))
    else {
        return Ok(());
    };
    let merged = ranges::insert(&acked(c, device, conv.id).await?, cut);
    save_acked(c, device, conv.id, &merged).await?;
    c.execute(
        "INSERT INTO cleared (uid, client_id, conv_id, cleared_seq, missed) VALUES ($1, $2, $3, 0, $4)
         ON CONFLICT (uid, client_id, conv_id) DO UPDATE SET missed = cleared.missed + excluded.missed",
        &[&device.uid, &device.client_id, &conv.id, &int(skipped.count)],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(super) async fn clear_counters(
    c: &impl GenericClient,
    device: &Device,
    version: u64,
) -> Result<()> {
    let latest = c
        .query_opt(
            "SELECT digest_version FROM devices WHERE uid = $1 AND client_id = $2",
            &[&device.uid, &device.client_id],
        )
        .await
        .map_err(pg_error)?
        .map(|row| row.cell(0).map(uint))
        .transpose()?;
    if version == 0 || latest.is_none_or(|latest| version > latest) {
        return Err(StoreError::NotFound(format!(
            "digest version {version} was never sent to this device"
        )));
    }
    c.execute(
        "INSERT INTO cleared (uid, client_id, conv_id, cleared_seq, missed_cleared)
         SELECT uid, client_id, conv_id, max_seq, missed FROM digest_entries
         WHERE uid = $1 AND client_id = $2 AND version = $3
         ON CONFLICT (uid, client_id, conv_id)
         DO UPDATE SET cleared_seq = GREATEST(cleared.cleared_seq, excluded.cleared_seq),
                       missed_cleared = GREATEST(cleared.missed_cleared, excluded.missed_cleared)",
        &[&device.uid, &device.client_id, &int(version)],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}
