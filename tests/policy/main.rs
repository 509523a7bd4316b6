//! The Lua policy and hooks: masking and denial, hostile scripts in the sandbox, Lua hooks for
//! pass-through traffic and logins, an embedder's hooks.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod hooks;
mod lua_hooks;
mod policy;
mod sandbox;
