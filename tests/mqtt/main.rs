//! MQTT as a broker: pass-through topics, the Paho-style conformance checks, flow control, client
//! ids, transports, limits, rumqttd links, the topic ACL and the web demo.
//!
//! One test binary per area (each binary links the library once); shared helpers in
//! `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod client_ids;
mod conformance;
mod flow_control;
mod limits;
mod links;
mod passthrough;
mod silence;
mod spec;
mod topic_acl;
mod transports;
mod web;
