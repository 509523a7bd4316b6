//! The TypeScript SDK (`clients/typescript`) against a real mqtt-im: its own test file, run
//! with Node's test runner, talks to this broker over MQTT (and through a proxy of its own
//! that drops the network or loses answers, and SIGKILLs an mqtt-im process of its own).
//! `scripts/sdk-ts.sh` installs and builds it.

use std::path::Path;
use std::process::Command;

use crate::common::*;

#[tokio::test]
async fn the_typescript_sdk_passes_its_suite_against_a_real_broker() {
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = Command::new(project.join("scripts/sdk-ts.sh"))
        .status()
        .unwrap();
    assert!(built.success(), "scripts/sdk-ts.sh failed");
    let broker = TestBroker::start_with(|config| {
        config.im.digest_last_n = 1;
        config.im.receipt_interval = mqtt_im::config::Period::millis(100);
        for n in 1..=20 {
            config.auth.users.insert(format!("t{n}"), "pw".into());
        }
        // Senders of the 10,000-message catch-up.
        for n in 1..=100 {
            config.auth.users.insert(format!("s{n}"), "pw".into());
        }
    })
    .await;
    let output = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "test/"])
        .current_dir(project.join("clients/typescript"))
        .env("BROKER_URL", format!("mqtt://{}", broker.addr))
        .env("MQTT_IM_BIN", env!("CARGO_BIN_EXE_mqtt-im"))
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test failed:\n{printed}\n{errors}"
    );
    assert!(printed.contains("pass 8"), "{printed}");
}
