//! Read receipts: answered from the members' read cursors (nothing is stored per message and
//! reader), and pushed to online senders as batched updates — per interval, per sender and
//! conversation, one `ReceiptList` naming whose cursor moved, never one per reader per message.

use crate::domain::Uid;
use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use prost::Message;

use super::{DeviceEvent, ImError, ImService};
use crate::store::{Conversation, SeqRange};
use crate::wire::pb;

/// Seqs per Receipts request.
const MAX_SEQS: usize = 100;
/// Reader names listed per message (the count is exact).
const MAX_READERS: usize = 100;

/// One member's read cursor moved from `before` to `after`.
#[derive(Debug, Clone)]
struct Move {
    reader: Uid,
    before: u64,
    after: u64,
}

/// Cursor moves since the last batch, per conversation.
#[derive(Debug, Default)]
pub(crate) struct ReadMoves {
    moves: Mutex<HashMap<Conversation, Vec<Move>>>,
}

impl ImService {
    /// Answers `Receipts`.
    pub(super) async fn receipts(
        &self,
        uid: &Uid,
        request: pb::Receipts,
    ) -> Result<pb::response::Result, ImError> {
        if request.seqs.len() > MAX_SEQS {
            return Err(ImError::Invalid(format!(
                "at most {MAX_SEQS} seqs per Receipts request"
            )));
        }
        let conversation = self.authorized(&request.conversation, uid).await?;
        let receipts = self
            .inner
            .store
            .receipts(&conversation, &request.seqs, MAX_READERS)
            .await?
            .into_iter()
            .map(|r| pb::Receipt {
                seq: r.seq,
                read_count: u32::try_from(r.read_count).unwrap_or(u32::MAX),
                readers: r.readers.into_iter().map(String::from).collect(),
                sender: r.sender.into(),
            })
            .collect();
        Ok(pb::response::Result::Receipts(pb::ReceiptList {
            conversation: request.conversation,
            receipts,
            reads: Vec::new(),
        }))
    }

    /// Moves `uid`'s read cursor and queues the move for the senders' next receipt update.
    pub(super) async fn mark_read(
        &self,
        uid: &Uid,
        request: pb::MarkRead,
    ) -> Result<pb::response::Result, ImError> {
        let conversation = self.authorized(&request.conversation, uid).await?;
        let marked = self.inner.store.mark_read(uid, &conversation, request.seq);
        let (before, after) = self.metrics().store_call("mark_read", marked).await?;
        if after > before {
            self.push_cancelled_by_read(uid, &conversation, after).await;
            if let Ok(mut moves) = self.inner.read_moves.moves.lock() {
                moves.entry(conversation).or_default().push(Move {
                    reader: uid.clone(),
                    before,
                    after,
                });
            }
        }
        Ok(pb::response::Result::Read(pb::ReadCursor {
            conversation: request.conversation,
            read_seq: after,
        }))
    }

    /// Sends the batched receipt updates: the senders of the newly read messages that are
    /// online (on any node) get, per conversation, whose cursors moved and to where.
    pub(super) async fn send_receipt_updates(&self) {
        let batch = match self.inner.read_moves.moves.lock() {
            Ok(mut moves) => std::mem::take(&mut *moves),
            Err(_) => return,
        };
        for (conversation, moves) in batch {
            if let Err(e) = self.notify_senders(&conversation, &moves).await {
                tracing::debug!(error = %e, %conversation, "receipt update not sent");
            }
        }
    }

    async fn notify_senders(
        &self,
        conversation: &Conversation,
        moves: &[Move],
    ) -> Result<(), ImError> {
        let lo = moves.iter().map(|m| m.before + 1).min().unwrap_or(1);
        let hi = moves.iter().map(|m| m.after).max().unwrap_or(0);
        let Some(range) = SeqRange::new(lo, hi) else {
            return Ok(());
        };
        let mut latest: HashMap<&Uid, u64> = HashMap::new();
        for m in moves {
            let read = latest.entry(&m.reader).or_default();
            *read = (*read).max(m.after);
        }
        for sender in self.inner.store.senders(conversation, range).await? {
            let reads: Vec<pb::ReadCursorOf> = latest
                .iter()
                .filter(|(reader, _)| **reader != &sender)
                .map(|(reader, read_seq)| pb::ReadCursorOf {
                    uid: reader.to_string(),
                    read_seq: *read_seq,
                })
                .collect();
            if reads.is_empty() {
                continue;
            }
            let update = pb::Response {
                request_id: String::new(),
                status: pb::Status::Ok as i32,
                error: None,
                result: Some(pb::response::Result::Receipts(pb::ReceiptList {
                    conversation: conversation.name_for(&sender),
                    receipts: Vec::new(),
                    reads,
                })),
            };
            let payload = Bytes::from(update.encode_to_vec());
            for sink in self.inner.presence.sinks(&sender) {
                sink.push(DeviceEvent::Notice(payload.clone()));
            }
            self.hand_over_notice(&sender, &payload);
        }
        Ok(())
    }
}
