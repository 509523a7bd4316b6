//! Every protobuf type that arrives from outside: chat envelopes and requests from clients,
//! hand-overs from other nodes. Decoding must fail cleanly, never panic, and what decodes must
//! re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_im::wire::{decode, pb};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = decode::<pb::Envelope>(data, 65_536, "Envelope") {
        let _ = envelope.encode_to_vec();
    }
    if let Ok(request) = decode::<pb::Request>(data, 4096, "Request") {
        let _ = request.encode_to_vec();
    }
    if let Ok(handover) = decode::<pb::Handover>(data, 4 << 20, "Handover") {
        let _ = handover.encode_to_vec();
    }
});
