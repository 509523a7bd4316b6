//! Requests on `req`: Pull (newest unacked page, the previous page's cursor acknowledges it),
//! Ack, ClearCounters, MarkRead, Receipts, History, DeviceForget, pushers and group
//! management. Every request gets exactly one Response.

use super::inbox::rehydrate;
use super::{ImError, ImService};
use crate::store::{self, Device, SeqRange};
use crate::wire::{self, pb};

/// Largest request payload; requests are small.
const MAX_REQUEST_BYTES: usize = 4096;

impl ImService {
    /// Answers one encoded `Request` from `device`. Failures become an error Response.
    #[tracing::instrument(skip(self, payload), fields(uid = %device.uid, client_id = %crate::text::LoggedId(&device.client_id)))]
    pub async fn request(&self, device: &Device, payload: &[u8]) -> pb::Response {
        let request: pb::Request = match wire::decode(payload, MAX_REQUEST_BYTES, "Request") {
            Ok(request) => request,
            Err(e) => return error_response(String::new(), &ImError::from(e)),
        };
        let request_id = request.request_id.clone();
        match self.dispatch(device, request).await {
            Ok(result) => pb::Response {
                request_id,
                status: pb::Status::Ok as i32,
                error: None,
                result: Some(result),
            },
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                error_response(request_id, &e)
            }
        }
    }

    async fn dispatch(
        &self,
        device: &Device,
        request: pb::Request,
    ) -> Result<pb::response::Result, ImError> {
        use pb::request::Kind;
        use pb::response::Result as Reply;
        let store = &self.inner.store;
        let metrics = self.metrics();
        match request.kind {
            Some(Kind::Pull(pull)) => {
                let conversation = self.authorized(&pull.conversation, &device.uid).await?;
                let ack = pull.ack.map(cursor_range).transpose()?;
                self.commit_live_acks(device, Some(&conversation)).await;
                let size = self.page_size(pull.page_size);
                let page = metrics
                    .store_call("pull", store.pull(device, &conversation, ack, size))
                    .await?;
                metrics.pulls.inc();
                metrics.pull_page.observe(page.messages.len() as f64);
                Ok(Reply::Page(page_reply(pull.conversation, page)))
            }
            Some(Kind::Ack(ack)) => {
                let conversation = self.authorized(&ack.conversation, &device.uid).await?;
                let range = SeqRange::new(1, ack.up_to)
                    .ok_or_else(|| ImError::Invalid("up_to must be at least 1".into()))?;
                let acked = metrics
                    .store_call("ack", store.ack(device, &conversation, range))
                    .await?;
                Ok(Reply::Acked(pb::Acked {
                    conversation: ack.conversation,
                    seq: acked,
                }))
            }
            Some(Kind::ClearCounters(clear)) => {
                metrics
                    .store_call(
                        "clear_counters",
                        store.clear_counters(device, clear.version),
                    )
                    .await?;
                Ok(Reply::Cleared(pb::Cleared {
                    version: clear.version,
                }))
            }
            Some(Kind::MarkRead(read)) => self.mark_read(&device.uid, read).await,
            Some(Kind::Receipts(receipts)) => self.receipts(&device.uid, receipts).await,
            Some(Kind::History(history)) => {
                let conversation = self.authorized(&history.conversation, &device.uid).await?;
                let before = (history.before_seq > 0).then_some(history.before_seq);
                let size = self.page_size(history.page_size);
                let page = metrics
                    .store_call("history", store.history(&conversation, before, size))
                    .await?;
                Ok(Reply::Page(page_reply(history.conversation, page)))
            }
            Some(
                group @ (Kind::GroupCreate(_)
                | Kind::GroupAdd(_)
                | Kind::GroupRemove(_)
                | Kind::GroupLeave(_)
                | Kind::GroupMembers(_)
                | Kind::MyGroups(_)),
            ) => self.group_request(&device.uid, group).await,
            Some(Kind::DeviceForget(forget)) => self.forget_device(&device.uid, forget).await,
            Some(Kind::PusherSet(set)) => self.set_pusher(device, set).await,
            Some(Kind::PusherRemove(remove)) => self.remove_pusher(&device.uid, remove).await,
            Some(Kind::PusherList(_)) => self.list_pushers(&device.uid).await,
            None => Err(ImError::Invalid("request has no kind".into())),
        }
    }

    /// The requested page size, defaulted and capped by configuration.
    fn page_size(&self, asked: u32) -> usize {
        let settings = &self.inner.settings;
        match usize::try_from(asked) {
            Ok(0) | Err(_) => settings.page_size_default,
            Ok(n) => n.min(settings.page_size_max),
        }
    }
}

fn cursor_range(cursor: pb::Cursor) -> Result<SeqRange, ImError> {
    SeqRange::new(cursor.from_seq, cursor.to_seq).ok_or_else(|| {
        ImError::Invalid(format!(
            "ack cursor [{}, {}] is empty or starts at 0",
            cursor.from_seq, cursor.to_seq
        ))
    })
}

fn page_reply(conversation: String, page: store::Page) -> pb::Page {
    let cursor = match (page.messages.last(), page.messages.first()) {
        (Some(oldest), Some(newest)) => Some(pb::Cursor {
            from_seq: oldest.seq,
            to_seq: newest.seq,
        }),
        _ => None,
    };
    pb::Page {
        conversation,
        messages: page.messages.iter().map(rehydrate).collect(),
        cursor,
        end: page.end,
        gone: page.gone,
    }
}

/// The error Response for a failed request.
fn error_response(request_id: String, error: &ImError) -> pb::Response {
    let told = error.to_client();
    pb::Response {
        request_id,
        status: pb::Status::Error as i32,
        error: Some(pb::Error {
            code: told.code as i32,
            message: told.message,
            topic: String::new(),
        }),
        result: None,
    }
}
