//! Group-committed appends on the embedded store: a batch of concurrent appends (each one a
//! message that a PUBACK would wait for) into 100 conversations.
//!
//! `cargo bench -p mqtt-im-plugin --bench store`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqtt_im::domain::Uid;
use mqtt_im::store::{Conversation, EmbeddedStore, NewMessage, Store};

fn message(n: u64) -> NewMessage {
    let peer = Uid::parse(&format!("p{}", n % 100)).unwrap();
    let bob = Uid::parse("bob").unwrap();
    NewMessage {
        conversation: Conversation::direct(&bob, &peer),
        sender: peer,
        sender_device: "d".into(),
        msg_id: format!("m{n}"),
        server_time: 0,
        body: vec![7; 256],
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("bench.db"), 512).unwrap());
    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("store");
    for batch in [1u64, 100, 500] {
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("embedded: {batch} concurrent appends"), |b| {
            b.to_async(&runtime).iter(|| {
                let (store, next) = (store.clone(), next.clone());
                async move {
                    let appends = (0..batch).map(|_| {
                        let store = store.clone();
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        async move { store.append(message(n)).await.unwrap() }
                    });
                    futures::future::join_all(appends).await
                }
            })
        });
    }
    group.finish();
    runtime.block_on(store.close());
}

criterion_group!(store, benches);
criterion_main!(store);
