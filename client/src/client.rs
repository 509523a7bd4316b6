//! The handle an app holds: cheap to clone, every call answered by the engine task or read
//! from the local store.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::{Command, Engine};
use crate::error::ClientError;
use crate::model::{
    Content, Conversation, ConversationId, Event, Fetched, Message, Receipt, Unread,
};
use crate::options::ClientOptions;
use crate::pb;
use crate::store::{ConversationRecord, LocalStore, StoreError};

/// A connected (or reconnecting) chat client for one user on one device.
#[derive(Clone)]
pub struct Client {
    uid: String,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    store: Arc<dyn LocalStore>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts the client on `store`: it connects in the background (and reconnects with a
    /// jittered backoff), and resends what the outbox still holds from an earlier run.
    /// Call from within a tokio runtime.
    ///
    /// # Errors
    /// Invalid options, or a store that fails or belongs to another user.
    pub async fn start(
        options: ClientOptions,
        store: Arc<dyn LocalStore>,
    ) -> Result<Self, ClientError> {
        let mqtt_options = options.mqtt()?;
        let uid = options.uid.clone();
        let opened = Arc::clone(&store);
        let bound = uid.clone();
        let (outbox, groups) = tokio::task::spawn_blocking(move || {
            opened.bind_user(&bound)?;
            let groups: BTreeSet<String> = opened
                .conversations()?
                .into_iter()
                .filter_map(|c| c.id.gid().map(str::to_owned))
                .collect();
            Ok::<_, StoreError>((opened.outbox()?, groups))
        })
        .await
        .map_err(|_| ClientError::Closed)??;
        let (mqtt, eventloop) = rumqttc::v5::AsyncClient::new(mqtt_options, 4096);
        let (events, _) = broadcast::channel(4096);
        let (commands, receiver) = mpsc::channel(256);
        let engine = Engine::new(
            &options,
            mqtt,
            Arc::clone(&store),
            events.clone(),
            outbox,
            groups,
        );
        let span = tracing::info_span!("mqtt_im_client", uid = %uid, device = %options.device_id);
        tokio::spawn(tracing::Instrument::instrument(
            engine.run(eventloop, receiver),
            span,
        ));
        Ok(Self {
            uid,
            commands,
            events,
            store,
        })
    }

    /// This user's id.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Everything that happens from now on, in order. A receiver that falls more than 4,096
    /// events behind gets `Lagged` and should re-read `conversations()`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)
    }

    /// Sends a text: it is in the local timeline and the outbox at once (returned, state
    /// `Sending`), and sent, resent across reconnects and restarts with the same `msg_id`,
    /// until the server stored it (`Event::Updated` with `Delivery::Sent`).
    ///
    /// # Errors
    /// An empty text, or the local store failing.
    pub async fn send_text(
        &self,
        conversation: &ConversationId,
        text: impl Into<String>,
    ) -> Result<Message, ClientError> {
        let text = text.into();
        if text.is_empty() {
            return Err(ClientError::Invalid("empty text".into()));
        }
        self.send(conversation, Content::Text(text)).await
    }

    /// Sends any content (see [`Client::send_text`]).
    ///
    /// # Errors
    /// The local store failing.
    pub async fn send(
        &self,
        conversation: &ConversationId,
        content: Content,
    ) -> Result<Message, ClientError> {
        let conversation = conversation.clone();
        self.ask(|reply| Command::Send {
            conversation,
            content,
            reply,
        })
        .await?
    }

    /// Fetches older messages of a conversation from the server into the local store:
    /// first what this device has not acknowledged (Pull, newest first, each page
    /// acknowledging the one before), then holes, then older history. Read them with
    /// [`Client::messages`].
    ///
    /// # Errors
    /// Offline, a refusal (not a member), a timeout.
    pub async fn fetch_older(
        &self,
        conversation: &ConversationId,
        limit: u32,
    ) -> Result<Fetched, ClientError> {
        let conversation = conversation.clone();
        self.ask(|reply| Command::Fetch {
            conversation,
            limit,
            reply,
        })
        .await?
    }

    /// Moves this user's read cursor (it never goes back); returns the cursor now.
    ///
    /// # Errors
    /// Offline, a refusal, a timeout.
    pub async fn mark_read(
        &self,
        conversation: &ConversationId,
        seq: u64,
    ) -> Result<u64, ClientError> {
        let conversation = conversation.clone();
        self.ask(|reply| Command::MarkRead {
            conversation,
            seq,
            reply,
        })
        .await?
    }

    /// Any request of the protocol, answered by its `Response` (an error status is an
    /// `Err`).
    ///
    /// # Errors
    /// Offline, a refusal, a timeout.
    pub async fn request(&self, kind: pb::request::Kind) -> Result<pb::Response, ClientError> {
        self.ask(|reply| Command::Request { kind, reply }).await?
    }

    /// Who has read these messages (from the members' read cursors, on the server).
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn receipts(
        &self,
        conversation: &ConversationId,
        seqs: Vec<u64>,
    ) -> Result<Vec<Receipt>, ClientError> {
        let kind = pb::request::Kind::Receipts(pb::Receipts {
            conversation: conversation.to_string(),
            seqs,
        });
        match self.request(kind).await?.result {
            Some(pb::response::Result::Receipts(list)) => Ok(list
                .receipts
                .into_iter()
                .map(|r| Receipt {
                    seq: r.seq,
                    read_count: r.read_count,
                    readers: r.readers,
                })
                .collect()),
            _ => Err(ClientError::Protocol(
                "Receipts answered without receipts".into(),
            )),
        }
    }

    /// Creates group `gid` (this user owns it) and joins its conversation.
    ///
    /// # Errors
    /// As [`Client::request`] (a group that exists: `BAD_REQUEST`).
    pub async fn create_group(&self, gid: &str, members: Vec<String>) -> Result<(), ClientError> {
        let kind = pb::request::Kind::GroupCreate(pb::GroupCreate {
            gid: gid.to_owned(),
            members,
        });
        self.request(kind).await?;
        self.group_changed(gid, true).await
    }

    /// Adds members to a group (owner or admin).
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn add_members(&self, gid: &str, members: Vec<String>) -> Result<(), ClientError> {
        let kind = pb::request::Kind::GroupAdd(pb::GroupAdd {
            gid: gid.to_owned(),
            members,
            role: pb::Role::Member as i32,
        });
        self.request(kind).await.map(drop)
    }

    /// Leaves a group and stops receiving it.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn leave_group(&self, gid: &str) -> Result<(), ClientError> {
        let kind = pb::request::Kind::GroupLeave(pb::GroupLeave {
            gid: gid.to_owned(),
        });
        self.request(kind).await?;
        self.group_changed(gid, false).await
    }

    /// Joins the conversation of a group this user was added to by someone else (also done
    /// at each connect, and when a digest names the group).
    ///
    /// # Errors
    /// The client is closed.
    pub async fn group_changed(&self, gid: &str, joined: bool) -> Result<(), ClientError> {
        self.commands
            .send(Command::Group {
                gid: gid.to_owned(),
                joined,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Forgets one of this user's other devices (a lost phone): its offline state is
    /// deleted and its connections closed.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn forget_device(&self, device_id: &str) -> Result<(), ClientError> {
        let kind = pb::request::Kind::DeviceForget(pb::DeviceForget {
            client_id: device_id.to_owned(),
        });
        self.request(kind).await.map(drop)
    }

    /// Registers this device's pusher for offline push (the server's `push.allowed_urls`
    /// names the gateways it may use); setting the same one again refreshes it. Returns the
    /// pusher as stored.
    ///
    /// # Errors
    /// As [`Client::request`] (NOT_AUTHORIZED for a gateway the server does not allow).
    pub async fn set_pusher(&self, pusher: pb::PusherSet) -> Result<pb::Pusher, ClientError> {
        let mut stored = self
            .pushers_of(pb::request::Kind::PusherSet(pusher))
            .await?;
        stored
            .pop()
            .ok_or_else(|| ClientError::Protocol("PusherSet answered without the pusher".into()))
    }

    /// Removes one of this user's pushers.
    ///
    /// # Errors
    /// As [`Client::request`] (NOT_FOUND if there is no such pusher).
    pub async fn remove_pusher(&self, app_id: &str, pushkey: &str) -> Result<(), ClientError> {
        let kind = pb::request::Kind::PusherRemove(pb::PusherRemove {
            app_id: app_id.to_owned(),
            pushkey: pushkey.to_owned(),
        });
        self.pushers_of(kind).await.map(drop)
    }

    /// This user's pushers, on all of its devices.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn pushers(&self) -> Result<Vec<pb::Pusher>, ClientError> {
        self.pushers_of(pb::request::Kind::PusherList(pb::PusherList {}))
            .await
    }

    async fn pushers_of(&self, kind: pb::request::Kind) -> Result<Vec<pb::Pusher>, ClientError> {
        match self.request(kind).await?.result {
            Some(pb::response::Result::Pushers(list)) => Ok(list.pushers),
            _ => Err(ClientError::Protocol(
                "a pusher request answered without pushers".into(),
            )),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn LocalStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ClientError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || call(store.as_ref()))
            .await
            .map_err(|_| ClientError::Closed)?
            .map_err(ClientError::from)
    }

    /// Every conversation, newest activity first, with its badge and last message.
    ///
    /// # Errors
    /// The local store failing.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        let uid = self.uid.clone();
        let mut list = self
            .read(move |store| {
                store
                    .conversations()?
                    .into_iter()
                    .map(|record| view(store, &uid, record))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        list.sort_by(|a, b| b.last_time.cmp(&a.last_time).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// One conversation's state.
    ///
    /// # Errors
    /// The local store failing.
    pub async fn conversation(
        &self,
        id: &ConversationId,
    ) -> Result<Option<Conversation>, ClientError> {
        let (uid, id) = (self.uid.clone(), id.clone());
        self.read(move |store| {
            store
                .conversation(&id)?
                .map(|record| view(store, &uid, record))
                .transpose()
        })
        .await
    }

    /// Up to `limit` local messages, newest first: those still sending (or failed) first,
    /// then by seq below `before` (`None`: from the newest).
    ///
    /// # Errors
    /// The local store failing.
    pub async fn messages(
        &self,
        conversation: &ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, ClientError> {
        let conversation = conversation.clone();
        self.read(move |store| store.messages(&conversation, before, limit))
            .await
    }

    /// Badges: per conversation and in all.
    ///
    /// # Errors
    /// The local store failing.
    pub async fn unread(&self) -> Result<Unread, ClientError> {
        let conversations = self.conversations().await?;
        let mut unread = Unread::default();
        for conversation in conversations.into_iter().filter(|c| c.unread > 0) {
            unread.total += conversation.unread;
            unread
                .conversations
                .push((conversation.id, conversation.unread));
        }
        Ok(unread)
    }

    /// Members' read cursors known in a conversation (from receipts and digests).
    ///
    /// # Errors
    /// The local store failing.
    pub async fn readers(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<(String, u64)>, ClientError> {
        let conversation = conversation.clone();
        self.read(move |store| store.readers(&conversation)).await
    }

    /// Disconnects cleanly and stops. What is still in the outbox is sent at the next start.
    ///
    /// # Errors
    /// None in practice: an engine already gone counts as closed.
    pub async fn close(&self) -> Result<(), ClientError> {
        match self.ask(|reply| Command::Close { reply }).await {
            Ok(()) | Err(ClientError::Closed) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// The app's view of a conversation record.
fn view(
    store: &dyn LocalStore,
    uid: &str,
    record: ConversationRecord,
) -> Result<Conversation, StoreError> {
    let own = store.count_from(&record.id, uid, record.read_seq)?;
    let last_message = store.messages(&record.id, None, 1)?.into_iter().next();
    Ok(Conversation {
        unread: record.unread(own),
        max_seq: record.max_seq,
        read_seq: record.read_seq,
        peer_read_seq: record.peer_read_seq,
        last_time: record.last_time,
        missed: record.missed,
        gone: record.gone,
        last_message,
        id: record.id,
    })
}
