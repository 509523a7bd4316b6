//! The sync engine: one task owns the MQTT connection and every write to the local store,
//! so live messages, pages, send results and reads are applied one at a time in the order
//! they arrived.
//!
//! rumqttc's event loop is polled from the same task through a future that is kept across
//! loop turns (never dropped half-way), and nothing is published while it is down: the
//! publishes waiting for a packet id are then exactly those rumqttc will number next.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PubAckReason, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ClientError;
use crate::model::{ConnectionState, Content, ConversationId, Delivery, Event, Fetched, Message};
use crate::pb;
use crate::store::{ConversationRecord, LocalStore, OutboxItem, SeqRange};

/// Most messages one hole fill asks for.
const HOLE_PAGE: u64 = 100;

/// What the app asks the engine to do.
pub(crate) enum Command {
    Send {
        conversation: ConversationId,
        content: Content,
        reply: oneshot::Sender<Result<Message, ClientError>>,
    },
    Request {
        kind: pb::request::Kind,
        reply: oneshot::Sender<Result<pb::Response, ClientError>>,
    },
    Fetch {
        conversation: ConversationId,
        limit: u32,
        reply: oneshot::Sender<Result<Fetched, ClientError>>,
    },
    MarkRead {
        conversation: ConversationId,
        seq: u64,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    Group {
        gid: String,
        joined: bool,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Which page a Pull or History answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Pull,
    /// Messages skipped between two held ranges.
    Hole,
    History,
}

/// What an answer is for.
/// What one of our QoS 1 publishes was, to know what its PUBACK answers.
enum Published {
    Chat(String),
    Request(String),
}

enum Waiting {
    App(oneshot::Sender<Result<pb::Response, ClientError>>),
    /// Nothing to do with the answer (ClearCounters, Ack).
    Nothing,
    Groups,
    Page {
        conversation: ConversationId,
        kind: PageKind,
        reply: Option<oneshot::Sender<Result<Fetched, ClientError>>>,
    },
    Read {
        conversation: ConversationId,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
}

struct Pending {
    waiting: Waiting,
    deadline: Instant,
}

/// One engine per client.
pub(crate) struct Engine {
    pub(crate) uid: String,
    pub(crate) prefix: String,
    pub(crate) page_size: u32,
    pub(crate) request_timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) mqtt: AsyncClient,
    pub(crate) store: Arc<dyn LocalStore>,
    pub(crate) events: broadcast::Sender<Event>,
    online: bool,
    failures: u32,
    /// Our QoS 1 publishes not numbered by rumqttc yet, oldest first.
    unnumbered: VecDeque<Published>,
    /// Publishes waiting for their PUBACK, by packet id.
    awaiting_ack: HashMap<u16, Published>,
    requests: HashMap<String, Pending>,
    next_request: u64,
    /// Per client instance, so request ids of an earlier run never match.
    run: u32,
    outbox: Vec<OutboxItem>,
    /// The outbox entry of each conversation on the wire now (one at a time keeps order).
    in_flight: HashMap<ConversationId, String>,
    /// When a conversation whose head failed for now is tried again.
    retry_at: HashMap<ConversationId, Instant>,
    /// Conversations with a hole fill under way.
    filling: BTreeSet<ConversationId>,
    /// Up to where each conversation was acknowledged with Ack on this run.
    acked_up_to: HashMap<ConversationId, u64>,
    groups: BTreeSet<String>,
    closing: Option<oneshot::Sender<()>>,
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Runs a store call off the async workers.
/// A conversation's badge: messages after the read cursor, less `uid`'s own.
fn unread_in(
    store: &dyn LocalStore,
    record: &ConversationRecord,
    uid: &str,
) -> Result<u64, crate::store::StoreError> {
    Ok(record.unread(store.count_from(&record.id, uid, record.read_seq)?))
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn LocalStore>,
    call: impl FnOnce(&dyn LocalStore) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || call(store.as_ref()))
        .await
        .map_err(|_| ClientError::Closed)?
        .map_err(ClientError::from)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn reason_code(reason: &PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

impl Engine {
    pub(crate) fn new(
        options: &crate::ClientOptions,
        mqtt: AsyncClient,
        store: Arc<dyn LocalStore>,
        events: broadcast::Sender<Event>,
        outbox: Vec<OutboxItem>,
        groups: BTreeSet<String>,
    ) -> Self {
        Self {
            uid: options.uid.clone(),
            prefix: options.prefix.clone(),
            page_size: options.page_size.max(1),
            request_timeout: options.request_timeout,
            backoff: (options.backoff_min, options.backoff_max),
            mqtt,
            store,
            events,
            online: false,
            failures: 0,
            unnumbered: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            requests: HashMap::new(),
            next_request: 0,
            run: rand::thread_rng().gen(),
            outbox,
            in_flight: HashMap::new(),
            retry_at: HashMap::new(),
            filling: BTreeSet::new(),
            acked_up_to: HashMap::new(),
            groups,
            closing: None,
        }
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: the app reads the store.
        let _ = self.events.send(event);
    }

    fn inbox(&self) -> String {
        format!("{}/u/{}", self.prefix, self.uid)
    }

    /// Runs until the client is closed or dropped.
    pub(crate) async fn run(
        mut self,
        mut eventloop: EventLoop,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        self.emit(Event::Connection(ConnectionState::Connecting));
        let mut delay: Option<Duration> = None;
        loop {
            if let Some(wait) = delay.take() {
                let mut sleep = pin!(tokio::time::sleep(wait));
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        command = commands.recv() => match command {
                            Some(command) => self.command(command).await,
                            None => return,
                        },
                        _ = tick.tick() => self.tick().await,
                    }
                    if let Some(reply) = self.closing.take() {
                        let _ = reply.send(());
                        return;
                    }
                }
                self.emit(Event::Connection(ConnectionState::Connecting));
            }
            let result = {
                let mut poll = pin!(eventloop.poll());
                loop {
                    tokio::select! {
                        result = &mut poll => break result,
                        command = commands.recv() => match command {
                            Some(command) => self.command(command).await,
                            None => return,
                        },
                        _ = tick.tick() => self.tick().await,
                    }
                }
            };
            match result {
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) if self.closing.is_some() => {
                    if let Some(reply) = self.closing.take() {
                        let _ = reply.send(());
                    }
                    return;
                }
                Ok(event) => self.on_event(event).await,
                Err(error) => {
                    if let Some(reply) = self.closing.take() {
                        let _ = reply.send(());
                        return;
                    }
                    delay = Some(self.disconnected(error.to_string()));
                }
            }
        }
    }

    /// Forgets what was on the wire; returns the jittered delay before the next attempt.
    fn disconnected(&mut self, reason: String) -> Duration {
        tracing::debug!(%reason, "connection lost");
        self.online = false;
        self.unnumbered.clear();
        self.awaiting_ack.clear();
        self.in_flight.clear();
        self.filling.clear();
        for (_, pending) in self.requests.drain() {
            fail(pending.waiting, ClientError::Disconnected);
        }
        self.emit(Event::Connection(ConnectionState::Offline { reason }));
        self.failures = self.failures.saturating_add(1);
        let (min, max) = self.backoff;
        let ceiling = min
            .saturating_mul(1 << self.failures.min(16))
            .min(max)
            .max(min);
        // Full jitter above half the ceiling: a fleet cut at once does not return at once.
        let half = ceiling / 2;
        half + ceiling
            .saturating_sub(half)
            .mul_f64(rand::thread_rng().gen::<f64>())
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(pending) = self.requests.remove(&id) {
                self.give_up(pending.waiting, ClientError::Timeout(self.request_timeout));
            }
        }
        let due: Vec<ConversationId> = self
            .retry_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for conversation in due {
            self.retry_at.remove(&conversation);
            self.pump(&conversation).await;
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Send {
                conversation,
                content,
                reply,
            } => {
                let _ = reply.send(self.send(conversation, content).await);
            }
            Command::Request { kind, reply } => self.request(kind, Waiting::App(reply)),
            Command::Fetch {
                conversation,
                limit,
                reply,
            } => self.fetch(conversation, limit, reply).await,
            Command::MarkRead {
                conversation,
                seq,
                reply,
            } => {
                let kind = pb::request::Kind::MarkRead(pb::MarkRead {
                    conversation: conversation.to_string(),
                    seq,
                });
                self.request(
                    kind,
                    Waiting::Read {
                        conversation,
                        reply,
                    },
                );
            }
            Command::Group { gid, joined } => self.group_changed(gid, joined).await,
            Command::Close { reply } => {
                if self.mqtt.try_disconnect().is_err() || !self.online {
                    let _ = reply.send(());
                    self.closing = None;
                    return;
                }
                self.closing = Some(reply);
            }
        }
    }

    // ---- sending -------------------------------------------------------------------------

    async fn send(&mut self, conversation: ConversationId, content: Content) -> Result<Message> {
        let msg_id = new_msg_id();
        let time = now_ms();
        let (topic, chat_type, to) = match conversation.gid() {
            Some(gid) => (
                format!("{}/g/{gid}", self.prefix),
                pb::ChatType::Group,
                gid.to_owned(),
            ),
            None => {
                let peer = conversation.peer().unwrap_or_default().to_owned();
                (
                    format!("{}/u/{peer}", self.prefix),
                    pb::ChatType::Single,
                    peer,
                )
            }
        };
        let envelope = pb::Envelope {
            cmd: pb::Cmd::Chat as i32,
            time,
            body: Some(pb::envelope::Body::Chat(pb::ChatMessage {
                v: 1,
                msg_id: msg_id.clone(),
                chat_type: chat_type as i32,
                ack_flg: true,
                to,
                time,
                msg: Some(content.to_wire()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let message = Message {
            conversation: conversation.clone(),
            msg_id: msg_id.clone(),
            from: self.uid.clone(),
            seq: None,
            time,
            server_time: None,
            content,
            delivery: Delivery::Sending {
                attempts: 0,
                error: None,
            },
        };
        let item = OutboxItem {
            msg_id,
            conversation: conversation.clone(),
            topic,
            payload: envelope.encode_to_vec(),
        };
        let (stored, queued) = (message.clone(), item.clone());
        blocking(&self.store, move |store| {
            if store.conversation(&queued.conversation)?.is_none() {
                store.insert(&ConversationRecord::new(queued.conversation.clone()), &[])?;
            }
            store.enqueue(&stored, &queued)
        })
        .await?;
        self.outbox.push(item);
        self.emit(Event::Message(message.clone()));
        self.pump(&conversation).await;
        Ok(message)
    }

    /// Publishes the conversation's oldest outbox entry if nothing of it is on the wire.
    async fn pump(&mut self, conversation: &ConversationId) {
        if !self.online
            || self.in_flight.contains_key(conversation)
            || self.retry_at.contains_key(conversation)
        {
            return;
        }
        let Some(item) = self
            .outbox
            .iter()
            .find(|item| &item.conversation == conversation)
            .cloned()
        else {
            return;
        };
        if self
            .mqtt
            .try_publish(
                item.topic.clone(),
                QoS::AtLeastOnce,
                false,
                item.payload.clone(),
            )
            .is_err()
        {
            self.retry_later(conversation, 1);
            return;
        }
        self.unnumbered
            .push_back(Published::Chat(item.msg_id.clone()));
        self.in_flight
            .insert(conversation.clone(), item.msg_id.clone());
        let uid = self.uid.clone();
        let msg_id = item.msg_id.clone();
        let updated = blocking(&self.store, move |store| {
            let Some(mut message) = store.message(&uid, &msg_id)? else {
                return Ok(None);
            };
            if let Delivery::Sending { attempts, .. } = &mut message.delivery {
                *attempts += 1;
            }
            store.update(&message, None)?;
            Ok(Some(message))
        })
        .await;
        if let Ok(Some(message)) = updated {
            if matches!(message.delivery, Delivery::Sending { attempts, .. } if attempts > 1) {
                self.emit(Event::Updated(message));
            }
        }
    }

    fn retry_later(&mut self, conversation: &ConversationId, attempts: u32) {
        let (min, max) = self.backoff;
        let wait = min.saturating_mul(1 << attempts.min(16)).min(max);
        self.retry_at
            .insert(conversation.clone(), Instant::now() + wait);
    }

    async fn pub_ack(&mut self, ack: PubAck) {
        let Some(published) = self.awaiting_ack.remove(&ack.pkid) else {
            return;
        };
        let code = reason_code(&ack.reason);
        if code < 0x80 {
            return; // taken: the SendResult or the Response follows
        }
        let reason = ack
            .properties
            .and_then(|p| p.reason_string)
            .unwrap_or_else(|| format!("refused with reason code {code:#04x}"));
        match published {
            Published::Chat(msg_id) => self.chat_refused(msg_id, code, reason).await,
            // A refused request gets no answer: its caller learns why now.
            Published::Request(request_id) => {
                if let Some(pending) = self.requests.remove(&request_id) {
                    self.give_up(pending.waiting, ClientError::Refused { code, reason });
                }
            }
        }
    }

    async fn chat_refused(&mut self, msg_id: String, code: u8, reason: String) {
        let Some(mut message) = self.own_message(&msg_id).await else {
            return;
        };
        let conversation = message.conversation.clone();
        self.in_flight.remove(&conversation);
        // The store being unavailable, or a rate limit: try again later.
        let retry = code == 0x80 || (code == 0x97 && reason.contains("rate"));
        if retry {
            let attempts = match &message.delivery {
                Delivery::Sending { attempts, .. } => *attempts,
                _ => 1,
            };
            message.delivery = Delivery::Sending {
                attempts,
                error: Some(reason),
            };
            self.retry_later(&conversation, attempts);
            self.save_message(message, None).await;
            return;
        }
        message.delivery = Delivery::Failed { code, reason };
        let record = self.record(&conversation).await;
        self.outbox.retain(|item| item.msg_id != msg_id);
        self.save_message(message, record).await;
        self.pump(&conversation).await;
    }

    async fn own_message(&self, msg_id: &str) -> Option<Message> {
        let (uid, msg_id) = (self.uid.clone(), msg_id.to_owned());
        blocking(&self.store, move |store| store.message(&uid, &msg_id))
            .await
            .ok()
            .flatten()
    }

    async fn save_message(&self, message: Message, done: Option<ConversationRecord>) {
        let saved = message.clone();
        if blocking(&self.store, move |store| {
            store.update(&saved, done.as_ref())
        })
        .await
        .is_ok()
        {
            self.emit(Event::Updated(message));
        }
    }

    async fn send_result(&mut self, result: pb::SendResult) {
        let Some(mut message) = self.own_message(&result.msg_id).await else {
            return;
        };
        let conversation = message.conversation.clone();
        if self.in_flight.get(&conversation) == Some(&result.msg_id) {
            self.in_flight.remove(&conversation);
        }
        self.outbox.retain(|item| item.msg_id != result.msg_id);
        if message.delivery != Delivery::Sent && result.seq > 0 {
            message.seq = Some(result.seq);
            message.server_time = Some(result.server_time);
            message.delivery = Delivery::Sent;
            let mut record = self
                .record(&conversation)
                .await
                .unwrap_or_else(|| ConversationRecord::new(conversation.clone()));
            record.hold(result.seq);
            record.last_time = record.last_time.max(result.server_time);
            self.save_message(message, Some(record)).await;
        }
        self.pump(&conversation).await;
    }

    // ---- requests ------------------------------------------------------------------------

    fn request(&mut self, kind: pb::request::Kind, waiting: Waiting) {
        if !self.online {
            fail(waiting, ClientError::Offline);
            return;
        }
        self.next_request += 1;
        let request_id = format!("{:08x}-{}", self.run, self.next_request);
        let request = pb::Request {
            request_id: request_id.clone(),
            kind: Some(kind),
        };
        let topic = format!("{}/req", self.inbox());
        if self
            .mqtt
            .try_publish(topic, QoS::AtLeastOnce, false, request.encode_to_vec())
            .is_err()
        {
            fail(waiting, ClientError::Offline);
            return;
        }
        self.unnumbered
            .push_back(Published::Request(request_id.clone()));
        self.requests.insert(
            request_id,
            Pending {
                waiting,
                deadline: Instant::now() + self.request_timeout,
            },
        );
    }

    /// A request that will get no answer: a hole fill may be tried again, the caller learns why.
    fn give_up(&mut self, waiting: Waiting, error: ClientError) {
        if let Waiting::Page {
            conversation,
            kind: PageKind::Hole,
            ..
        } = &waiting
        {
            self.filling.remove(conversation);
        }
        fail(waiting, error);
    }

    async fn response(&mut self, response: pb::Response) {
        if let Some(pending) = self.requests.remove(&response.request_id) {
            self.answered(pending.waiting, response).await;
            return;
        }
        match response.result {
            Some(pb::response::Result::SendResult(result)) => self.send_result(result).await,
            Some(pb::response::Result::Receipts(list)) => self.receipts_moved(list).await,
            _ => {
                if let Some(error) = response.error {
                    tracing::debug!(code = error.code, message = %error.message, "server error frame");
                }
            }
        }
    }

    async fn answered(&mut self, waiting: Waiting, response: pb::Response) {
        let error = (response.status != pb::Status::Ok as i32).then(|| server_error(&response));
        match waiting {
            Waiting::App(reply) => {
                let _ = reply.send(error.map_or(Ok(response), Err));
            }
            Waiting::Nothing => {}
            Waiting::Groups => {
                if let Some(pb::response::Result::Groups(list)) = response.result {
                    for gid in list.groups.into_keys() {
                        self.group_changed(gid, true).await;
                    }
                }
            }
            Waiting::Read {
                conversation,
                reply,
            } => {
                let read = match (error, response.result) {
                    (Some(error), _) => Err(error),
                    (None, Some(pb::response::Result::Read(read))) => {
                        self.read_moved(&conversation, read.read_seq).await;
                        Ok(read.read_seq)
                    }
                    _ => Err(ClientError::Protocol(
                        "MarkRead answered without a cursor".into(),
                    )),
                };
                let _ = reply.send(read);
            }
            Waiting::Page {
                conversation,
                kind,
                reply,
            } => {
                let result = match (error, response.result) {
                    (Some(error), _) => Err(error),
                    (None, Some(pb::response::Result::Page(page))) => {
                        self.page(&conversation, kind, page).await
                    }
                    _ => Err(ClientError::Protocol(
                        "a page request answered without a page".into(),
                    )),
                };
                if kind == PageKind::Hole {
                    self.filling.remove(&conversation);
                }
                match (reply, result) {
                    (Some(reply), result) => {
                        let _ = reply.send(result);
                    }
                    (None, Err(error)) => tracing::debug!(%conversation, %error, "page failed"),
                    (None, Ok(_)) => {}
                }
                self.fill_holes(&conversation).await;
            }
        }
    }

    // ---- fetching --------------------------------------------------------------------

    async fn fetch(
        &mut self,
        conversation: ConversationId,
        limit: u32,
        reply: oneshot::Sender<Result<Fetched>>,
    ) {
        let record = self
            .record(&conversation)
            .await
            .unwrap_or_else(|| ConversationRecord::new(conversation.clone()));
        let limit = limit.clamp(1, 500);
        let name = conversation.to_string();
        let (kind, request) = if !record.pull_end {
            let pull = pb::Pull {
                conversation: name,
                page_size: limit,
                ack: record.pull_cursor.map(cursor),
            };
            (PageKind::Pull, pb::request::Kind::Pull(pull))
        } else if let Some(hole) = record.holes().first() {
            let history = history(
                name,
                hole.hi + 1,
                (hole.hi - hole.lo + 1).min(u64::from(limit)),
            );
            (PageKind::Hole, history)
        } else {
            match record.held.first() {
                Some(oldest) if oldest.lo <= 1 => {
                    let _ = reply.send(Ok(Fetched {
                        added: 0,
                        end: true,
                    }));
                    return;
                }
                oldest => {
                    let before = oldest.map_or(0, |r| r.lo);
                    (PageKind::History, history(name, before, u64::from(limit)))
                }
            }
        };
        self.request(
            request,
            Waiting::Page {
                conversation,
                kind,
                reply: Some(reply),
            },
        );
    }

    /// Asks History for the newest hole of `conversation`, one fill at a time.
    async fn fill_holes(&mut self, conversation: &ConversationId) {
        if !self.online || self.filling.contains(conversation) {
            return;
        }
        let Some(record) = self.record(conversation).await else {
            return;
        };
        let Some(hole) = record.holes().first().copied() else {
            return;
        };
        self.filling.insert(conversation.clone());
        let size = (hole.hi - hole.lo + 1).min(HOLE_PAGE);
        self.request(
            history(conversation.to_string(), hole.hi + 1, size),
            Waiting::Page {
                conversation: conversation.clone(),
                kind: PageKind::Hole,
                reply: None,
            },
        );
    }

    async fn page(
        &mut self,
        conversation: &ConversationId,
        kind: PageKind,
        page: pb::Page,
    ) -> Result<Fetched> {
        let mut record = self
            .record(conversation)
            .await
            .unwrap_or_else(|| ConversationRecord::new(conversation.clone()));
        let end = page.end;
        if page.gone > 0 {
            record.gone += page.gone;
            self.emit(Event::Gone {
                conversation: conversation.clone(),
                count: page.gone,
            });
        }
        let messages: Vec<Message> = page
            .messages
            .into_iter()
            .map(|chat| Message::from_wire(conversation.clone(), chat, &self.uid))
            .collect();
        let mut follow_up = None;
        if kind == PageKind::Pull {
            record.pull_cursor = page.cursor.map(|c| SeqRange {
                lo: c.from_seq,
                hi: c.to_seq,
            });
            if end {
                match record.pull_cursor.take() {
                    // The last page is acknowledged by one more Pull naming it.
                    Some(last) => follow_up = Some(last),
                    None => record.pull_end = true,
                }
            }
        }
        let added = self.apply(record, messages).await?;
        if let Some(last) = follow_up {
            let pull = pb::Pull {
                conversation: conversation.to_string(),
                page_size: self.page_size,
                ack: Some(cursor(last)),
            };
            self.request(
                pb::request::Kind::Pull(pull),
                Waiting::Page {
                    conversation: conversation.clone(),
                    kind: PageKind::Pull,
                    reply: None,
                },
            );
        }
        self.ack_held_prefix(conversation).await;
        let end =
            end && (kind == PageKind::History || kind == PageKind::Pull && follow_up.is_none());
        Ok(Fetched { added, end })
    }

    /// Once the device holds everything from seq 1 on, acknowledges it in one Ack, so what
    /// History filled is not pulled again.
    async fn ack_held_prefix(&mut self, conversation: &ConversationId) {
        let Some(record) = self.record(conversation).await else {
            return;
        };
        let Some(first) = record.held.first().filter(|r| r.lo == 1) else {
            return;
        };
        let done = self.acked_up_to.get(conversation).copied().unwrap_or(0);
        if first.hi > done && record.holes().is_empty() && record.pull_end {
            self.acked_up_to.insert(conversation.clone(), first.hi);
            let ack = pb::Ack {
                conversation: conversation.to_string(),
                up_to: first.hi,
            };
            self.request(pb::request::Kind::Ack(ack), Waiting::Nothing);
        }
    }

    // ---- applying what arrived -------------------------------------------------------

    async fn record(&self, conversation: &ConversationId) -> Option<ConversationRecord> {
        let id = conversation.clone();
        blocking(&self.store, move |store| store.conversation(&id))
            .await
            .ok()
            .flatten()
    }

    /// Stores `messages` (new ones only) with `record`, confirms own messages found among
    /// them, and tells the app. Returns how many were new.
    async fn apply(&mut self, record: ConversationRecord, messages: Vec<Message>) -> Result<usize> {
        let added = self.apply_all(vec![(record, messages)]).await?;
        Ok(added.into_iter().sum())
    }

    /// [`apply`](Self::apply) for several conversations in one store transaction (a
    /// digest); returns how many messages were new in each.
    async fn apply_all(
        &mut self,
        mut batch: Vec<(ConversationRecord, Vec<Message>)>,
    ) -> Result<Vec<usize>> {
        for (record, messages) in &mut batch {
            for message in messages.iter() {
                if let Some(seq) = message.seq {
                    record.hold(seq);
                }
                record.last_time = record.last_time.max(message.server_time.unwrap_or(0));
            }
        }
        let (saved, uid) = (batch.clone(), self.uid.clone());
        let (new, badges) = blocking(&self.store, move |store| {
            // Each badge as stored before this change (callers hand over records they moved).
            let mut before = Vec::with_capacity(saved.len());
            for (record, _) in &saved {
                let stored = store
                    .conversation(&record.id)?
                    .unwrap_or_else(|| ConversationRecord::new(record.id.clone()));
                before.push(unread_in(store, &stored, &uid)?);
            }
            let new = store.insert_all(&saved)?;
            let mut badges = Vec::with_capacity(saved.len());
            for ((record, _), before) in saved.iter().zip(before) {
                badges.push((before, unread_in(store, record, &uid)?));
            }
            Ok((new, badges))
        })
        .await?;
        let mut added_per_conversation = Vec::with_capacity(batch.len());
        for (((record, messages), new), (before, after)) in batch.into_iter().zip(new).zip(badges) {
            let mut added = 0;
            for (message, new) in messages.into_iter().zip(new) {
                if new {
                    added += 1;
                    self.emit(Event::Message(message));
                } else if message.from == self.uid {
                    self.confirm_own(message, &record).await;
                }
            }
            if after != before {
                self.emit(Event::Unread {
                    conversation: record.id.clone(),
                    unread: after,
                });
            }
            added_per_conversation.push(added);
        }
        Ok(added_per_conversation)
    }

    /// An own message that came back from the server (History, a digest) while this device
    /// still had it sending: it is stored, whatever happened to its answer.
    async fn confirm_own(&mut self, stored: Message, record: &ConversationRecord) {
        let Some(mut local) = self.own_message(&stored.msg_id).await else {
            return;
        };
        if !matches!(local.delivery, Delivery::Sending { .. }) {
            return;
        }
        local.seq = stored.seq;
        local.server_time = stored.server_time;
        local.delivery = Delivery::Sent;
        self.outbox.retain(|item| item.msg_id != local.msg_id);
        let conversation = local.conversation.clone();
        if self.in_flight.get(&conversation) == Some(&local.msg_id) {
            self.in_flight.remove(&conversation);
        }
        self.save_message(local, Some(record.clone())).await;
    }

    async fn live(&mut self, conversation: ConversationId, envelope: pb::Envelope) {
        let Some(pb::envelope::Body::Chat(chat)) = envelope.body else {
            return;
        };
        let record = self
            .record(&conversation)
            .await
            .unwrap_or_else(|| ConversationRecord::new(conversation.clone()));
        let message = Message::from_wire(conversation.clone(), chat, &self.uid);
        if let Err(error) = self.apply(record, vec![message]).await {
            tracing::warn!(%error, "live message not stored");
            return;
        }
        self.fill_holes(&conversation).await;
    }

    /// Applies the digest; it is confirmed (`ClearCounters`) only once stored, so a digest
    /// the local store could not take comes again at the next connect.
    async fn digest(&mut self, digest: pb::Digest) {
        let version = digest.version;
        if !digest.pushers_gone.is_empty() {
            self.emit(Event::PushersGone(digest.pushers_gone));
        }
        match self.store_digest(digest.sessions).await {
            Ok(()) => {
                let clear = pb::ClearCounters { version };
                self.request(pb::request::Kind::ClearCounters(clear), Waiting::Nothing);
            }
            Err(error) => tracing::warn!(%error, "digest not stored"),
        }
        self.emit(Event::Connection(ConnectionState::Online));
    }

    async fn store_digest(&mut self, sessions: HashMap<String, pb::Session>) -> Result<()> {
        let known: HashMap<ConversationId, ConversationRecord> =
            blocking(&self.store, |store| store.conversations())
                .await?
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect();
        let mut batch = Vec::with_capacity(sessions.len());
        let mut readers_moved = Vec::new();
        for (name, session) in sessions {
            let Some(conversation) = ConversationId::parse(&name) else {
                continue;
            };
            if let Some(gid) = conversation.gid() {
                self.group_changed(gid.to_owned(), true).await;
            }
            let mut record = known
                .get(&conversation)
                .cloned()
                .unwrap_or_else(|| ConversationRecord::new(conversation.clone()));
            record.max_seq = record.max_seq.max(session.max_seq);
            record.read_seq = record.read_seq.max(session.read_seq);
            record.last_time = record.last_time.max(session.timestamp);
            if session.unacked > 0 {
                record.pull_end = false;
            }
            if session.missed > 0 {
                record.missed += session.missed;
                self.emit(Event::Missed {
                    conversation: conversation.clone(),
                    count: session.missed,
                });
            }
            if session.peer_read_seq > record.peer_read_seq {
                if let Some(peer) = conversation.peer() {
                    readers_moved.push((
                        conversation.clone(),
                        peer.to_owned(),
                        session.peer_read_seq,
                    ));
                }
            }
            record.peer_read_seq = record.peer_read_seq.max(session.peer_read_seq);
            let previews: Vec<Message> = session
                .last_msgs
                .into_iter()
                .map(|chat| Message::from_wire(conversation.clone(), chat, &self.uid))
                .collect();
            batch.push((record, previews));
        }
        let conversations: Vec<ConversationId> = batch.iter().map(|(r, _)| r.id.clone()).collect();
        self.apply_all(batch).await?;
        for (conversation, peer, read_seq) in readers_moved {
            self.reader_moved(&conversation, peer, read_seq).await;
        }
        for conversation in &conversations {
            self.fill_holes(conversation).await;
        }
        Ok(())
    }

    async fn read_moved(&mut self, conversation: &ConversationId, read_seq: u64) {
        let Some(mut record) = self.record(conversation).await else {
            return;
        };
        if read_seq <= record.read_seq {
            return;
        }
        record.read_seq = read_seq;
        let _ = self.apply(record, Vec::new()).await;
    }

    async fn reader_moved(&self, conversation: &ConversationId, uid: String, read_seq: u64) {
        let (id, reader) = (conversation.clone(), uid.clone());
        if blocking(&self.store, move |store| {
            store.set_reader(&id, &reader, read_seq)
        })
        .await
        .is_ok()
        {
            self.emit(Event::Read {
                conversation: conversation.clone(),
                uid,
                read_seq,
            });
        }
    }

    /// Batched receipt updates pushed to a sender: others' read cursors moved.
    async fn receipts_moved(&mut self, list: pb::ReceiptList) {
        let Some(conversation) = ConversationId::parse(&list.conversation) else {
            return;
        };
        let furthest = list.reads.iter().map(|r| r.read_seq).max().unwrap_or(0);
        if let Some(mut record) = self.record(&conversation).await {
            if furthest > record.peer_read_seq {
                record.peer_read_seq = furthest;
                let _ = self.apply(record, Vec::new()).await;
            }
        }
        for read in list.reads {
            self.reader_moved(&conversation, read.uid, read.read_seq)
                .await;
        }
    }

    async fn group_changed(&mut self, gid: String, joined: bool) {
        let topic = format!("{}/g/{gid}", self.prefix);
        if !joined {
            self.groups.remove(&gid);
            let _ = self.mqtt.try_unsubscribe(topic);
            return;
        }
        if !self.groups.insert(gid.clone()) {
            return;
        }
        let conversation = ConversationId::group(&gid);
        if self.record(&conversation).await.is_none() {
            let record = ConversationRecord::new(conversation);
            let _ = blocking(&self.store, move |store| store.insert(&record, &[])).await;
        }
        if self.online {
            let _ = self.mqtt.try_subscribe(topic, QoS::AtLeastOnce);
        }
    }

    async fn connected(&mut self) {
        self.online = true;
        self.failures = 0;
        let inbox = format!("{}/#", self.inbox());
        let _ = self.mqtt.try_subscribe(inbox, QoS::AtLeastOnce);
        for gid in &self.groups {
            let _ = self
                .mqtt
                .try_subscribe(format!("{}/g/{gid}", self.prefix), QoS::AtLeastOnce);
        }
        self.request(
            pb::request::Kind::MyGroups(pb::MyGroups {}),
            Waiting::Groups,
        );
        let conversations: BTreeSet<ConversationId> =
            self.outbox.iter().map(|i| i.conversation.clone()).collect();
        for conversation in conversations {
            self.pump(&conversation).await;
        }
    }

    async fn on_event(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Incoming(Packet::ConnAck(_)) => self.connected().await,
            MqttEvent::Incoming(Packet::Publish(publish)) => {
                self.incoming(&publish).await;
                // Acknowledged only now that it is in the local store.
                let _ = self.mqtt.try_ack(&publish);
            }
            MqttEvent::Incoming(Packet::PubAck(ack)) => self.pub_ack(ack).await,
            MqttEvent::Incoming(Packet::Disconnect(disconnect)) => {
                tracing::debug!(reason = ?disconnect.reason_code, "server disconnected");
            }
            MqttEvent::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(published) = self.unnumbered.pop_front() {
                    self.awaiting_ack.insert(pkid, published);
                }
            }
            _ => {}
        }
    }

    async fn incoming(&mut self, publish: &Publish) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let inbox = self.inbox();
        let payload = publish.payload.as_ref();
        if topic == inbox {
            if let Ok(envelope) = pb::Envelope::decode(payload) {
                let from = match &envelope.body {
                    Some(pb::envelope::Body::Chat(chat)) => chat.from.clone(),
                    None => return,
                };
                if let Some(conversation) = ConversationId::parse(&format!("u/{from}")) {
                    self.live(conversation, envelope).await;
                }
            }
        } else if topic == format!("{inbox}/digest") {
            if let Ok(digest) = pb::Digest::decode(payload) {
                self.digest(digest).await;
            }
        } else if topic == format!("{inbox}/resp") {
            if let Ok(response) = pb::Response::decode(payload) {
                self.response(response).await;
            }
        } else if let Some(gid) = topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix("/g/"))
        {
            if let (Some(conversation), Ok(envelope)) = (
                ConversationId::parse(&format!("g/{gid}")),
                pb::Envelope::decode(payload),
            ) {
                self.live(conversation, envelope).await;
            }
        }
    }
}

fn fail(waiting: Waiting, error: ClientError) {
    match waiting {
        Waiting::App(reply) => {
            let _ = reply.send(Err(error));
        }
        Waiting::Page {
            reply: Some(reply), ..
        } => {
            let _ = reply.send(Err(error));
        }
        Waiting::Read { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        Waiting::Page { reply: None, .. } | Waiting::Nothing | Waiting::Groups => {}
    }
}

fn server_error(response: &pb::Response) -> ClientError {
    let (code, message) =
        response
            .error
            .as_ref()
            .map_or((pb::ErrorCode::Unspecified, String::new()), |e| {
                (
                    pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
                    e.message.clone(),
                )
            });
    ClientError::Server { code, message }
}

fn cursor(range: SeqRange) -> pb::Cursor {
    pb::Cursor {
        from_seq: range.lo,
        to_seq: range.hi,
    }
}

fn history(conversation: String, before_seq: u64, page_size: u64) -> pb::request::Kind {
    pb::request::Kind::History(pb::History {
        conversation,
        before_seq,
        page_size: page_size.min(u64::from(u32::MAX)) as u32,
    })
}

/// 128 random bits: unique per sender without coordination.
fn new_msg_id() -> String {
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}
