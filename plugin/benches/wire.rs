//! Cost of the protobuf types on the hot paths: an inbound chat message and request decoded,
//! a live delivery and a 1,000-conversation digest encoded.
//!
//! `cargo bench -p mqtt-im-plugin --bench wire`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mqtt_im::wire::{decode, pb};
use prost::Message;

fn chat(text_bytes: usize) -> Vec<u8> {
    pb::Envelope::text("m-1", "bob", "x".repeat(text_bytes).as_str()).encode_to_vec()
}

fn digest(conversations: usize) -> pb::Digest {
    let preview = pb::ChatMessage {
        msg_id: "m".into(),
        from: "alice".into(),
        seq: 100,
        msg: Some(pb::Content {
            kind: Some(pb::content::Kind::Text("x".repeat(64))),
        }),
        ..pb::ChatMessage::default()
    };
    pb::Digest {
        version: 7,
        sessions: (0..conversations)
            .map(|i| {
                let session = pb::Session {
                    count: 100,
                    last_msgs: vec![preview.clone(); 3],
                    max_seq: 100,
                    unacked: 100,
                    ..pb::Session::default()
                };
                (format!("u/peer{i}"), session)
            })
            .collect(),
        server_time: 1,
        ..pb::Digest::default()
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    for size in [64, 1024] {
        let bytes = chat(size);
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("decode chat envelope {size} B text"), |b| {
            b.iter(|| decode::<pb::Envelope>(&bytes, 65_536, "Envelope").unwrap())
        });
    }
    let envelope = pb::Envelope::decode(chat(256).as_slice()).unwrap();
    group.bench_function("encode chat envelope 256 B text", |b| {
        b.iter(|| envelope.encode_to_vec())
    });
    let request = pb::Request {
        request_id: "r-1".into(),
        kind: Some(pb::request::Kind::Pull(pb::Pull {
            conversation: "u/alice".into(),
            page_size: 50,
            ack: Some(pb::Cursor {
                from_seq: 51,
                to_seq: 100,
            }),
        })),
    }
    .encode_to_vec();
    group.bench_function("decode pull request", |b| {
        b.iter(|| decode::<pb::Request>(&request, 4096, "Request").unwrap())
    });
    let large = digest(1_000);
    group.bench_function("encode digest of 1,000 conversations", |b| {
        b.iter_batched(
            || large.clone(),
            |d| d.encode_to_vec(),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(wire, benches);
criterion_main!(wire);
