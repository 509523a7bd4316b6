//! Cost of the shipped policy per message with a 10,000-word list, of the normalizing word
//! matcher alone, and how policy throughput scales with the number of Lua states.
//!
//! `cargo bench -p mqtt-im-plugin --bench policy`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqtt_im::config::{OnError, PolicySettings};
use mqtt_im::policy::{LuaPolicy, MessageView, Policy, WordList};

/// 10,000 distinct words, Latin and CJK, like a real sensitive-word list.
fn word_list(dir: &Path) -> std::path::PathBuf {
    let syllables = ["ka", "lo", "mi", "zu", "re", "ta", "no", "shi", "vo", "pe"];
    let cjk = ['坏', '蛋', '笨', '骗', '钱', '赌', '毒', '枪', '黑', '假'];
    let mut words = Vec::with_capacity(10_000);
    for i in 0..5_000usize {
        let a = syllables[i % 10];
        let b = syllables[(i / 10) % 10];
        let c = syllables[(i / 100) % 10];
        let d = syllables[(i / 1000) % 10];
        words.push(format!("{a}{b}{c}{d}x"));
        words.push(format!(
            "{}{}{}{}",
            cjk[i % 10],
            cjk[(i / 10) % 10],
            cjk[(i / 100) % 10],
            cjk[(i / 1000) % 10]
        ));
    }
    let path = dir.join("words.txt");
    std::fs::write(&path, words.join("\n")).unwrap();
    path
}

fn settings(dir: &Path, states: usize) -> PolicySettings {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts");
    PolicySettings {
        scripts: vec![
            scripts.join("policy.lua"),
            scripts.join("sensitive_words.lua"),
        ],
        on_error: OnError::Deny,
        states,
        memory_limit: 32 << 20,
        instruction_limit: 1_000_000,
        reload_interval: mqtt_im::config::Period::millis(0),
        words: BTreeMap::from([
            ("default".to_string(), word_list(dir)),
            (
                "blocked".to_string(),
                scripts.join("words").join("blocked.txt"),
            ),
        ]),
        config: BTreeMap::new(),
        ..mqtt_im::Config::default().policy
    }
}

fn message(text: &str) -> MessageView {
    MessageView {
        from: "alice".into(),
        to: "bob".into(),
        chat_type: "single",
        group: None,
        text: Some(text.into()),
        media_url: None,
        msg_id: "m1".into(),
        client_id: "alice-phone".into(),
        conversation: "u/bob".into(),
    }
}

const CLEAN: &str = "Hey Bob, are we still on for lunch tomorrow at noon? I found a nice new place near the station, 我们明天见。";
const DIRTY: &str = "Hey Bob, kalomizux is what they called it, and 坏蛋笨骗 too; are we still on for lunch tomorrow?";

fn per_message(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let policy = LuaPolicy::load(settings(dir.path(), 1)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("shipped_policy_10k_words");
    group.throughput(Throughput::Elements(1));
    for (name, text) in [("clean", CLEAN), ("masked", DIRTY)] {
        let message = message(text);
        group.bench_function(name, |b| {
            b.to_async(&runtime)
                .iter(|| policy.on_message(message.clone()));
        });
    }
    group.finish();
}

/// `words.find` and `words.mask` alone: normalization (NFKC, case, invisible characters,
/// confusables) and matching against 10,000 words.
fn words_only(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(word_list(dir.path())).unwrap();
    let list = WordList::new(source.lines(), true).unwrap();
    let mut group = c.benchmark_group("words_10k");
    group.throughput(Throughput::Elements(1));
    for (name, text) in [("clean", CLEAN), ("masked", DIRTY)] {
        group.bench_function(format!("find_{name}"), |b| b.iter(|| list.find(text)));
        group.bench_function(format!("mask_{name}"), |b| b.iter(|| list.mask(text, '*')));
    }
    group.finish();
}

/// Messages per second with `tasks` concurrent callers on a multi-thread runtime.
fn pool_scaling(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("pool_scaling");
    let calls = 2_000u64;
    group.throughput(Throughput::Elements(calls));
    for states in [1usize, 2] {
        let policy = Arc::new(LuaPolicy::load(settings(dir.path(), states)).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        group.bench_function(format!("states_{states}"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let started = Instant::now();
                    runtime.block_on(async {
                        let workers: Vec<_> = (0..2)
                            .map(|_| {
                                let policy = Arc::clone(&policy);
                                tokio::spawn(async move {
                                    let message = message(DIRTY);
                                    for _ in 0..calls / 2 {
                                        policy.on_message(message.clone()).await;
                                    }
                                })
                            })
                            .collect();
                        for worker in workers {
                            worker.await.unwrap();
                        }
                    });
                    total += started.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, per_message, words_only, pool_scaling);
criterion_main!(benches);
