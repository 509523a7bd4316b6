//! Who may connect: hashed users, password files, JWT, the HTTP auth service and PostgreSQL users
//! tables.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod auth;
mod http_auth;
mod jwt;
mod pg_auth;
