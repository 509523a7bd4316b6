#![doc = include_str!("../README.md")]

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
