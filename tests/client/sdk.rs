//! Helpers: an SDK client on a broker address, and waiting for its events.
#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mqtt_im_client::{
    Client, ClientOptions, ConnectionState, ConversationId, Delivery, Event, LocalStore,
    MemoryStore, Message, Server,
};
use tokio::sync::broadcast;

use crate::common::{eventually, WAIT};

/// An SDK client for `uid` (password "pw") on device `device`, with its events.
pub struct App {
    pub client: Client,
    pub events: broadcast::Receiver<Event>,
}

pub async fn app_on(addr: SocketAddr, uid: &str, device: &str, store: Arc<dyn LocalStore>) -> App {
    let server = Server::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let options = ClientOptions::new(server, uid, device)
        .with_password("pw")
        .with_backoff(Duration::from_millis(50), Duration::from_millis(400));
    let client = Client::start(options, store).await.unwrap();
    let events = client.events();
    App { client, events }
}

/// An SDK client on a memory store, online (its first digest applied).
pub async fn online(addr: SocketAddr, uid: &str, device: &str) -> App {
    let mut app = app_on(addr, uid, device, Arc::new(MemoryStore::default())).await;
    app.wait_online().await;
    app
}

pub fn with(peer: &str) -> ConversationId {
    ConversationId::direct(peer)
}

impl App {
    /// The next event `pick` accepts; fails after the test timeout.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event: {what}"))
                .unwrap_or_else(|error| panic!("event stream: {error} while waiting for {what}"));
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }

    pub async fn wait_online(&mut self) {
        self.wait_for("online", |e| {
            matches!(e, Event::Connection(ConnectionState::Online)).then_some(())
        })
        .await;
    }

    pub async fn wait_offline(&mut self) {
        self.wait_for("offline", |e| {
            matches!(e, Event::Connection(ConnectionState::Offline { .. })).then_some(())
        })
        .await;
    }

    /// Waits until the message `msg_id` of this user is sent; returns it.
    pub async fn wait_sent(&mut self, msg_id: &str) -> Message {
        self.wait_for("sent", |e| match e {
            Event::Updated(m) if m.msg_id == msg_id && m.delivery == Delivery::Sent => {
                Some(m.clone())
            }
            _ => None,
        })
        .await
    }

    /// Waits until each of these messages of this user to bob is stored by the server.
    pub async fn wait_all_sent(&self, msg_ids: &[&str]) {
        eventually(|| async {
            let mut all = true;
            for id in msg_ids {
                let message = self
                    .client
                    .messages(&with("bob"), None, 1000)
                    .await
                    .unwrap();
                all &= message
                    .iter()
                    .any(|m| m.msg_id == *id && m.delivery == Delivery::Sent);
            }
            all
        })
        .await;
    }

    /// Waits for a new message whose text is `text`.
    pub async fn wait_message(&mut self, text: &str) -> Message {
        self.wait_for(text, |e| match e {
            Event::Message(m) if m.content.text() == Some(text) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    /// Local texts of a conversation, oldest first.
    pub async fn texts(&self, conversation: &ConversationId) -> Vec<String> {
        let mut all = self
            .client
            .messages(conversation, None, 100_000)
            .await
            .unwrap();
        all.reverse();
        all.iter()
            .map(|m| m.content.text().unwrap_or_default().to_owned())
            .collect()
    }

    /// Fetches older messages until the server has nothing more.
    pub async fn fetch_all(&self, conversation: &ConversationId) {
        for _ in 0..10_000 {
            if self.client.fetch_older(conversation, 50).await.unwrap().end {
                return;
            }
        }
        panic!("fetch_older never reached the end");
    }

    pub async fn unread_of(&self, conversation: &ConversationId) -> u64 {
        self.client
            .conversation(conversation)
            .await
            .unwrap()
            .map_or(0, |c| c.unread)
    }
}
