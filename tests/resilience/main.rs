//! Several nodes and failing backends: the cluster over Redis, stalled or vanished PostgreSQL and
//! Redis.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod faults;
mod outage;
