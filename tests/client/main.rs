//! The Rust SDK (`mqtt-im-client`) as an app uses it: against a real mqtt-im over real
//! connections, with its own local store, through broker kills, dropped networks and lost
//! acknowledgements; registering for offline push.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod push;
mod recovery;
mod sdk;
mod sync;
mod typescript;
