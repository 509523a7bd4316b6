//! Members, roles, receipts and the removal log of the PostgreSQL backend.

use crate::domain::Uid;
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::error::Cells;
use super::queries::conversation;
use super::{int, pg_error, uint};
use crate::store::{
    receipts_from, Conversation, Member, Receipt, Removal, Role, SeqRange, StoreError,
};

type Result<T> = std::result::Result<T, StoreError>;

/// The text values of a one-column query.
async fn texts(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Uid>> {
    let rows = c.query(sql, params).await.map_err(pg_error)?;
    rows.iter()
        .map(|row| row.try_get(0).map_err(pg_error))
        .collect()
}

pub(super) async fn create_group(
    c: &impl GenericClient,
    key: &str,
    owner: &Uid,
    members: &[Uid],
) -> Result<()> {
    let created = c
        .execute(
            "INSERT INTO conversations (key) VALUES ($1) ON CONFLICT (key) DO NOTHING",
            &[&key],
        )
        .await
        .map_err(pg_error)?;
    if created == 0 {
        return Err(StoreError::Conflict(
            "the conversation exists already".into(),
        ));
    }
    add_members(c, key, &[owner.to_owned()], Role::Owner).await?;
    add_members(c, key, members, Role::Member).await?;
    Ok(())
}

pub(super) async fn add_members(
    c: &impl GenericClient,
    key: &str,
    uids: &[Uid],
    role: Role,
) -> Result<Vec<Uid>> {
    let conv = conversation(c, key)
        .await?
        .ok_or_else(StoreError::no_conversation)?;
    // One row per user: ON CONFLICT may not touch a row twice in one statement.
    let mut uids = uids.to_vec();
    uids.sort_unstable();
    uids.dedup();
    let before = texts(
        c,
        "SELECT uid FROM members WHERE conv_id = $1 AND uid = ANY($2)",
        &[&conv.id, &uids],
    )
    .await?;
    c.execute(
        "INSERT INTO members (uid, conv_id, role, joined_seq)
         SELECT u, $2, $3, $4 FROM unnest($1::text[]) AS u
         ON CONFLICT (uid, conv_id) DO UPDATE SET role = GREATEST(members.role, excluded.role)",
        &[&uids, &conv.id, &role.code(), &int(conv.max_seq)],
    )
    .await
    .map_err(pg_error)?;
    Ok(uids
        .into_iter()
        .filter(|uid| !before.contains(uid))
        .collect())
}

pub(super) async fn remove_members(
    c: &impl GenericClient,
    key: &str,
    uids: &[Uid],
) -> Result<Vec<Uid>> {
    let Some(conv) = conversation(c, key).await? else {
        return Ok(Vec::new());
    };
    let removed = texts(
        c,
        "DELETE FROM members WHERE conv_id = $1 AND uid = ANY($2) RETURNING uid",
        &[&conv.id, &uids],
    )
    .await?;
    c.execute(
        "INSERT INTO member_removals (conv_key, uid) SELECT $1, unnest($2::text[])",
        &[&key, &removed],
    )
    .await
    .map_err(pg_error)?;
    Ok(removed)
}

pub(super) async fn members(c: &impl GenericClient, key: &str) -> Result<Vec<Member>> {
    let conv = conversation(c, key)
        .await?
        .ok_or_else(StoreError::no_conversation)?;
    c.query(
        "SELECT uid, role, read_seq FROM members WHERE conv_id = $1 ORDER BY role DESC, uid",
        &[&conv.id],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        Ok(Member {
            uid: row.cell(0)?,
            role: Role::from_code(i64::from(row.cell::<i16>(1)?)),
            read_seq: uint(row.cell(2)?),
        })
    })
    .collect::<Result<_>>()
}

pub(super) async fn role(c: &impl GenericClient, uid: &Uid, key: &str) -> Result<Option<Role>> {
    c.query_opt(
        "SELECT m.role FROM members m JOIN conversations c ON c.id = m.conv_id
             WHERE c.key = $1 AND m.uid = $2",
        &[&key, &uid],
    )
    .await
    .map_err(pg_error)?
    .map(|row| Ok::<_, StoreError>(Role::from_code(i64::from(row.cell::<i16>(0)?))))
    .transpose()
}

pub(super) async fn group_memberships(
    c: &impl GenericClient,
    uid: &Uid,
) -> Result<Vec<(Conversation, Role)>> {
    c.query(
        "SELECT c.key, m.role FROM members m JOIN conversations c ON c.id = m.conv_id
             WHERE m.uid = $1 AND c.kind = 1 ORDER BY c.key",
        &[&uid],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        Ok((
            row.cell(0)?,
            Role::from_code(i64::from(row.cell::<i16>(1)?)),
        ))
    })
    .collect::<Result<_>>()
}

pub(super) async fn receipts(
    c: &impl GenericClient,
    key: &str,
    seqs: &[u64],
    max_readers: usize,
) -> Result<Vec<Receipt>> {
    let Some(conv) = conversation(c, key).await? else {
        return Ok(Vec::new());
    };
    let wanted: Vec<i64> = seqs.iter().map(|s| int(*s)).collect();
    let senders: Vec<(u64, Uid)> = c
        .query(
            "SELECT seq, sender FROM messages WHERE conv_id = $1 AND seq = ANY($2) ORDER BY seq",
            &[&conv.id, &wanted],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| Ok((uint(row.cell(0)?), row.cell(1)?)))
        .collect::<Result<_>>()?;
    let Some(lowest) = senders.iter().map(|(seq, _)| *seq).min() else {
        return Ok(Vec::new());
    };
    let readers: Vec<(Uid, u64)> = c
        .query(
            "SELECT uid, read_seq FROM members WHERE conv_id = $1 AND read_seq >= $2
             ORDER BY read_seq DESC, uid",
            &[&conv.id, &int(lowest)],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| Ok((row.cell(0)?, uint(row.cell(1)?))))
        .collect::<Result<_>>()?;
    Ok(receipts_from(&senders, &readers, max_readers))
}

pub(super) async fn senders(
    c: &impl GenericClient,
    key: &str,
    range: SeqRange,
) -> Result<Vec<Uid>> {
    let Some(conv) = conversation(c, key).await? else {
        return Ok(Vec::new());
    };
    texts(
        c,
        "SELECT DISTINCT sender FROM messages WHERE conv_id = $1 AND seq BETWEEN $2 AND $3",
        &[&conv.id, &int(range.lo), &int(range.hi)],
    )
    .await
}

pub(super) async fn removals_since(
    c: &impl GenericClient,
    after: u64,
    limit: usize,
) -> Result<Vec<Removal>> {
    c.query(
        "SELECT id, conv_key, uid FROM member_removals WHERE id > $1 ORDER BY id LIMIT $2",
        &[&int(after), &int(limit as u64)],
    )
    .await
    .map_err(pg_error)?
    .iter()
    .map(|row| {
        Ok(Removal {
            id: uint(row.cell(0)?),
            conversation: row.cell(1)?,
            uid: row.cell(2)?,
        })
    })
    .collect::<Result<_>>()
}
