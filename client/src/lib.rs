//! Client SDK for [mqtt-im](https://github.com/mqtt-im/mqtt-im): the sync protocol done for
//! the app, over MQTT 5 (rumqttc) with a local store.
//!
//! - **Send with local echo**: a message is in the local timeline and a persisted outbox at
//!   once, and resent with the same `msg_id` across reconnects and restarts until the server
//!   stored it; a duplicate answer counts as sent; per conversation the outbox keeps order.
//! - **Sync**: on each connect the digest updates the badges and is confirmed; older
//!   messages are fetched on demand with pull-as-ack; live messages and pages are merged by
//!   `msg_id`; holes (seqs skipped between held messages) are filled from History.
//! - **Read state**: `mark_read`, the peer's and members' read cursors, receipts.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mqtt_im_client::{Client, ClientOptions, ConversationId, Event, Server, SqliteStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::Tcp { host: "127.0.0.1".into(), port: 11883 };
//! let options = ClientOptions::new(server, "bob", "bob-laptop").with_password("bob-pw");
//! let client = Client::start(options, Arc::new(SqliteStore::open("bob.db")?)).await?;
//! let mut events = client.events();
//! client.send_text(&ConversationId::direct("alice"), "hi alice").await?;
//! while let Ok(event) = events.recv().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {:?}", message.from, message.content.text());
//!     }
//! }
//! # Ok(()) }
//! ```

mod client;
mod engine;
mod error;
mod model;
mod options;
pub mod store;

/// The protocol's wire types (package `mqtt_im.v1`), for [`Client::request`].
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/mqtt_im.v1.rs"));
}

pub use client::Client;
pub use error::ClientError;
pub use model::{
    ConnectionState, Content, Conversation, ConversationId, Delivery, Event, Fetched, Message,
    Receipt, Unread,
};
pub use options::{ClientOptions, Server};
pub use store::{LocalStore, MemoryStore, SqliteStore};
