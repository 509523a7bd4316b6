//! mqtt-im: offline messaging for MQTT, as a library around an embedded rumqttd.
//!
//! # Layout
//! - [`server`]: wiring — store, IM service, rumqttd on private loopback listeners, and the
//!   public listeners; [`Builder`] embeds all of it in a service around its own
//!   `rumqttd::Config`.
//! - [`listener`]: the public listeners, from mqtt-im's own `[listeners]` or, through
//!   [`rumqttd_config`], from a team's unchanged `rumqttd.toml`.
//! - `edge`: the hook layer; the only code that sees MQTT packets. It authenticates, relays
//!   clients to rumqttd in MQTT 5 and serves IM topics itself.
//! - [`domain`]: the shared nouns (users, groups, devices, conversations, recipients, the
//!   MQTT protocol and listener kinds), parsed once where they enter.
//! - [`im`]: users, devices, conversations, digests and pulls; no packets, no SQL.
//! - [`store`]: persistence behind one trait; knows nothing of MQTT.
//! - [`hook`]: the MQTT lifecycle as a trait: the Lua policy and an embedder's own hooks
//!   decide on connects, subscriptions and publishes, and hear of connections and deliveries.
//! - [`policy`]: the Lua policy host (sandboxed scripts for messages, connects, subscribes,
//!   pass-through publishes and logins).
//! - [`auth`]: who may connect (the provider chain) and the topic ACL for non-IM topics;
//!   `watch` re-reads their files, and the policy's, on change and SIGHUP.
//! - [`wire`]: protobuf wire types.
//! - [`config`]: the configuration tree: defaults, loading, the list of sections; each
//!   layer defines and checks its own section (`settings` has what they share: periods and
//!   problem lists), and `broker` sizes the embedded rumqttd.
//! - [`text`]: bounding and cleaning text from clients and scripts.
//! - [`metrics`]: Prometheus metrics; `status` serves them and the operator status over HTTP.
//!
//! Dependencies point one way: edge → im → store → domain; edge → auth → policy; edge → hook
//! ← policy (the Lua policy is one hook of the chain); config → each layer's settings;
//! server wires them together.
#![deny(rustdoc::broken_intra_doc_links)]
mod accept;
pub mod auth;
mod broker;
pub mod config;
pub mod domain;
mod edge;
pub mod hook;
pub mod im;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod push;
pub mod rumqttd_config;
pub mod server;
mod settings;
mod status;
pub mod store;
pub mod text;
mod throttle;
mod watch;
pub mod wire;

pub use async_trait::async_trait;
pub use config::Config;
pub use server::{Builder, Handle, Server};
