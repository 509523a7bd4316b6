//! The binary as operators run it: configuration errors, metrics and status, a team's rumqttd.toml,
//! embedding, restarts and crashes.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod config;
mod crash;
mod embed;
mod operations;
mod restart;
mod rumqttd_config;
