//! Offline push: devices register pushers (how a push gateway speaking the Matrix Push
//! Gateway API reaches their app while it has no connection). This module knows the rules a
//! pusher must follow and how to call a gateway; the IM service stores pushers, decides what
//! is owed and when, and sends it through [`gateway::Gateways`].

pub mod gateway;
pub mod settings;
mod validate;

pub(crate) use validate::{validate, PusherError};
