//! `examples/embed.rs` — a service that adds mqtt-im to its own `rumqttd::Config`, with a
//! hook of its own — runs its self-checks over real connections and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

/// The example's binary, which `cargo test` builds beside the test binaries.
fn example(name: &str) -> PathBuf {
    let test = std::env::current_exe().unwrap();
    let profile = test.parent().and_then(|deps| deps.parent()).unwrap();
    profile.join("examples").join(name)
}

#[test]
fn the_embedding_example_passes_its_checks() {
    let binary = example("embed");
    assert!(binary.exists(), "{} is not built", binary.display());
    let output = std::process::Command::new(&binary).output().unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in [
        "stamped telemetry",
        "only ops reaches admin topics",
        "chat stored",
        "bob's digest counts alice's message",
        "the hook heard of the connections",
        "the hook heard of the delivery to ops",
        "rewrites are counted",
        "all checks passed",
    ] {
        assert!(printed.contains(check), "missing {check:?} in:\n{printed}");
    }
}
