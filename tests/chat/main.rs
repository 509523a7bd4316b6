//! Chat semantics end to end: offline delivery, presence, digests and pulls, order, groups,
//! answers, errors, IM topic ACLs, bounded storage, pushers and offline push.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod acl;
mod answers;
mod bounded;
mod errors;
mod groups;
mod offline;
mod order;
mod presence;
mod pull;
mod push;
mod pushers;
mod reconnect_race;
