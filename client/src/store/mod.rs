//! The device's own database: conversations with their sync state, messages, the outbox
//! and read cursors. Behind a small trait so an app can bring its own; SQLite (bundled) is
//! the default, memory is for tests and short-lived tools.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

use crate::model::{ConversationId, Message};

/// Why the local store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("local database: {0}")]
    Database(String),
    /// The database belongs to another user.
    #[error("the local database belongs to user {owner}, not {uid}")]
    OtherUser {
        /// Who it belongs to.
        owner: String,
        /// Who opened it.
        uid: String,
    },
}

/// An inclusive range of seqs held locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// First seq.
    pub lo: u64,
    /// Last seq.
    pub hi: u64,
}

/// A conversation's sync state as the engine keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    /// The conversation.
    pub id: ConversationId,
    /// Newest seq known.
    pub max_seq: u64,
    /// This user's read cursor.
    pub read_seq: u64,
    /// The others' furthest read cursor.
    pub peer_read_seq: u64,
    /// Server time of the newest message.
    pub last_time: i64,
    /// Messages a backlog cap skipped (reported by digests).
    pub missed: u64,
    /// Messages retention deleted before they were fetched.
    pub gone: u64,
    /// Seqs held, merged, ascending.
    pub held: Vec<SeqRange>,
    /// The last Pull page's cursor, acknowledged by the next Pull.
    pub pull_cursor: Option<SeqRange>,
    /// The server said nothing older is unacknowledged for this device.
    pub pull_end: bool,
}

impl ConversationRecord {
    /// A conversation seen for the first time.
    pub fn new(id: ConversationId) -> Self {
        Self {
            id,
            max_seq: 0,
            read_seq: 0,
            peer_read_seq: 0,
            last_time: 0,
            missed: 0,
            gone: 0,
            held: Vec::new(),
            pull_cursor: None,
            pull_end: false,
        }
    }

    /// Records `seq` as held (and as known).
    pub fn hold(&mut self, seq: u64) {
        self.max_seq = self.max_seq.max(seq);
        let mut merged = Vec::with_capacity(self.held.len() + 1);
        let mut new = SeqRange { lo: seq, hi: seq };
        for range in self.held.drain(..) {
            if range.hi.saturating_add(1) < new.lo {
                merged.push(range);
            } else if new.hi.saturating_add(1) < range.lo {
                merged.push(new);
                new = range;
            } else {
                new = SeqRange {
                    lo: new.lo.min(range.lo),
                    hi: new.hi.max(range.hi),
                };
            }
        }
        merged.push(new);
        self.held = merged;
    }

    /// Whether `seq` is held.
    pub fn holds(&self, seq: u64) -> bool {
        self.held.iter().any(|r| r.lo <= seq && seq <= r.hi)
    }

    /// Gaps between held ranges, newest first: messages skipped while the device held
    /// both older and newer ones.
    pub fn holes(&self) -> Vec<SeqRange> {
        self.held
            .windows(2)
            .rev()
            .map(|pair| SeqRange {
                lo: pair[0].hi + 1,
                hi: pair[1].lo - 1,
            })
            .collect()
    }

    /// The badge: messages after this user's read cursor, less `own` (this user's own
    /// messages after it, which are never unread).
    pub fn unread(&self, own: u64) -> u64 {
        self.max_seq
            .saturating_sub(self.read_seq)
            .saturating_sub(own)
    }
}

/// A message waiting for the server, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// The message's id.
    pub msg_id: String,
    /// Its conversation (the outbox keeps send order per conversation).
    pub conversation: ConversationId,
    /// The topic it is published to.
    pub topic: String,
    /// The encoded `Envelope`.
    pub payload: Vec<u8>,
}

/// The device's database. Calls are short and blocking; the client makes them off the
/// async runtime's workers. Each write method is one transaction.
pub trait LocalStore: Send + Sync + 'static {
    /// Binds the database to `uid` on first use; refuses another user's database.
    fn bind_user(&self, uid: &str) -> Result<(), StoreError>;
    /// One conversation's state.
    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationRecord>, StoreError>;
    /// Every conversation.
    fn conversations(&self) -> Result<Vec<ConversationRecord>, StoreError>;
    /// Saves each conversation and inserts its messages not held yet (by sender and
    /// `msg_id`), all in one transaction (a digest touches every conversation at once);
    /// returns, per conversation, which messages were new.
    fn insert_all(
        &self,
        batch: &[(ConversationRecord, Vec<Message>)],
    ) -> Result<Vec<Vec<bool>>, StoreError>;
    /// [`insert_all`](Self::insert_all) for one conversation.
    fn insert(
        &self,
        conversation: &ConversationRecord,
        messages: &[Message],
    ) -> Result<Vec<bool>, StoreError> {
        let mut new = self.insert_all(&[(conversation.clone(), messages.to_vec())])?;
        Ok(new.pop().unwrap_or_default())
    }
    /// Saves a message written here and its outbox entry (local echo and outbox at once).
    fn enqueue(&self, message: &Message, item: &OutboxItem) -> Result<(), StoreError>;
    /// Replaces a message (by sender and `msg_id`); with `done`, its outbox entry is removed
    /// and `conversation` saved with it.
    fn update(
        &self,
        message: &Message,
        done: Option<&ConversationRecord>,
    ) -> Result<(), StoreError>;
    /// A message by sender and id.
    fn message(&self, from: &str, msg_id: &str) -> Result<Option<Message>, StoreError>;
    /// Up to `limit` messages, newest first: those still sending, then by seq below
    /// `before` (all when `None`; a `before` leaves out those sending).
    fn messages(
        &self,
        conversation: &ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;
    /// Messages from `uid` with a seq above `after` (own messages are never unread).
    fn count_from(
        &self,
        conversation: &ConversationId,
        uid: &str,
        after: u64,
    ) -> Result<u64, StoreError>;
    /// The outbox, in send order.
    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError>;
    /// Records a member's read cursor (never moving back).
    fn set_reader(
        &self,
        conversation: &ConversationId,
        uid: &str,
        read_seq: u64,
    ) -> Result<(), StoreError>;
    /// Members' read cursors in `conversation`.
    fn readers(&self, conversation: &ConversationId) -> Result<Vec<(String, u64)>, StoreError>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::{Content, Delivery};

    fn message(conversation: &ConversationId, from: &str, id: &str, seq: Option<u64>) -> Message {
        Message {
            conversation: conversation.clone(),
            msg_id: id.into(),
            from: from.into(),
            seq,
            time: 1,
            server_time: seq.map(|s| s as i64),
            content: Content::Text(format!("text {id}")),
            delivery: if seq.is_some() {
                Delivery::Received
            } else {
                Delivery::Sending {
                    attempts: 0,
                    error: None,
                }
            },
        }
    }

    #[test]
    fn held_ranges_merge_and_show_holes() {
        let mut record = ConversationRecord::new(ConversationId::direct("bob"));
        for seq in [1, 2, 3, 11, 12, 7] {
            record.hold(seq);
        }
        assert_eq!(record.max_seq, 12);
        assert_eq!(
            record.holes(),
            vec![SeqRange { lo: 8, hi: 10 }, SeqRange { lo: 4, hi: 6 }]
        );
        assert_eq!(record.unread(1), 11);
        for seq in 4..=10 {
            record.hold(seq);
        }
        assert_eq!(record.held, vec![SeqRange { lo: 1, hi: 12 }]);
        assert!(record.holds(5) && !record.holds(13));
    }

    fn behaves(store: &dyn LocalStore) {
        store.bind_user("alice").unwrap();
        assert!(matches!(
            store.bind_user("mallory"),
            Err(StoreError::OtherUser { .. })
        ));
        let bob = ConversationId::direct("bob");
        let mut record = ConversationRecord::new(bob.clone());
        record.hold(1);
        record.pull_cursor = Some(SeqRange { lo: 1, hi: 1 });
        let first = [message(&bob, "bob", "m1", Some(1))];
        assert_eq!(store.insert(&record, &first).unwrap(), vec![true]);
        // A duplicate (same sender and id) is not inserted again.
        let again = [
            message(&bob, "bob", "m1", Some(1)),
            message(&bob, "bob", "m2", Some(2)),
        ];
        record.hold(2);
        assert_eq!(store.insert(&record, &again).unwrap(), vec![false, true]);
        assert_eq!(store.conversation(&bob).unwrap().unwrap(), record);
        // Several conversations at once (a digest), each with its own answer.
        let carol = ConversationId::direct("carol");
        let mut carols = ConversationRecord::new(carol.clone());
        carols.hold(1);
        let batch = [
            (record.clone(), vec![message(&bob, "bob", "m2", Some(2))]),
            (
                carols.clone(),
                vec![message(&carol, "carol", "c1", Some(1))],
            ),
        ];
        assert_eq!(
            store.insert_all(&batch).unwrap(),
            vec![vec![false], vec![true]]
        );
        assert_eq!(store.conversation(&carol).unwrap().unwrap(), carols);

        let mine = message(&bob, "alice", "a1", None);
        let item = OutboxItem {
            msg_id: "a1".into(),
            conversation: bob.clone(),
            topic: "im/u/bob".into(),
            payload: vec![1, 2],
        };
        store.enqueue(&mine, &item).unwrap();
        assert_eq!(store.outbox().unwrap(), vec![item]);
        let listed = store.messages(&bob, None, 10).unwrap();
        let ids: Vec<_> = listed.iter().map(|m| m.msg_id.as_str()).collect();
        assert_eq!(ids, ["a1", "m2", "m1"], "sending first, then newest first");
        let older: Vec<_> = store.messages(&bob, Some(2), 10).unwrap();
        assert_eq!(older.len(), 1);

        let mut sent = mine.clone();
        sent.seq = Some(3);
        sent.delivery = Delivery::Sent;
        record.hold(3);
        store.update(&sent, Some(&record)).unwrap();
        assert!(store.outbox().unwrap().is_empty());
        assert_eq!(store.message("alice", "a1").unwrap().unwrap(), sent);
        assert_eq!(store.count_from(&bob, "alice", 0).unwrap(), 1);
        assert_eq!(store.count_from(&bob, "alice", 3).unwrap(), 0);

        store.set_reader(&bob, "bob", 3).unwrap();
        store.set_reader(&bob, "bob", 2).unwrap();
        assert_eq!(store.readers(&bob).unwrap(), vec![("bob".to_owned(), 3)]);
        assert_eq!(store.conversations().unwrap().len(), 2);
    }

    #[test]
    fn memory_store_behaves() {
        behaves(&MemoryStore::default());
    }

    #[test]
    fn sqlite_store_behaves_and_keeps_everything_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.db");
        behaves(&SqliteStore::open(&path).unwrap());
        let reopened = SqliteStore::open(&path).unwrap();
        let bob = ConversationId::direct("bob");
        assert_eq!(reopened.messages(&bob, None, 10).unwrap().len(), 3);
        assert!(reopened.bind_user("mallory").is_err());
    }
}
