//! Offline push: devices register pushers (how a push gateway speaking the Matrix Push
//! Gateway API reaches their app while it has no connection). This module knows the rules
//! a pusher must follow; the IM service stores them and answers the requests.

pub mod settings;
mod validate;

pub(crate) use validate::{validate, PusherError};
