//! mqtt-im: offline messaging for MQTT.
pub mod store;
