//! The browser demo (examples/web, on the TypeScript SDK) in headless Chromium against a real
//! broker's WebSocket listener: what a person sees through login, badge, open, pull-and-ack,
//! and each sent message's state (sending, sent, read, failed, retrying over the publish
//! rate). `scripts/web.sh setup` builds and vendors the SDK and installs Chromium when
//! missing; the screenshot is left in `target/web-demo.png`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use mqtt_im::server::ListenerKind;
use mqtt_im::wire::pb;
use prost::Message;

const SENT_FROM_BROWSER: &str = "hello from the browser";
/// Messages the page sends at once: more than the publish burst lets through.
const BURST: u64 = 30;

fn project() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project().join("target"), PathBuf::from);
    target.join("web-demo.png")
}

#[tokio::test]
async fn web_demo_shows_badges_pages_the_backlog_and_each_messages_state() {
    let setup = Command::new(project().join("scripts/web.sh"))
        .arg("setup")
        .status()
        .unwrap();
    assert!(setup.success(), "scripts/web.sh setup failed");

    let broker = TestBroker::start_with(|config| {
        config.listeners.ws = "127.0.0.1:0".parse().ok();
        config.im.max_message_bytes = 1000;
        config.im.receipt_interval = mqtt_im::config::Period::millis(100);
        config.limits.publish_rate = 5;
        config.limits.publish_burst = 20;
    })
    .await;
    let mut alice = Client::v4(broker.addr, "alice-phone", "alice", 30).await;
    for n in 1..=3 {
        let id = format!("m{n}");
        assert_eq!(
            alice
                .publish_acked("im/u/bob", chat(&id, "bob", &format!("message {n}"), false))
                .await,
            0
        );
    }
    alice.subscribe("im/u/alice/#", 1).await;
    let _ = alice.digest("alice").await;

    let screenshot = screenshot_path();
    let _ = std::fs::remove_file(&screenshot);
    let ws = broker.addr_of(ListenerKind::Ws);
    let output = tokio::process::Command::new("node")
        .arg(project().join("examples/web/test/browser.mjs"))
        .env("BROKER_WS", ws.to_string())
        .env("BROKER_TCP", broker.addr.to_string())
        .env("USER_NAME", "bob")
        .env("PASSWORD", "pw")
        .env("PEER", "alice")
        .env("PEER_PASSWORD", "pw")
        .env("UNREAD", "3")
        .env("SEND_TEXT", SENT_FROM_BROWSER)
        .env("TOO_LONG", "2000")
        .env("BURST", BURST.to_string())
        .env("SCREENSHOT", &screenshot)
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser run failed:\n{printed}\n{errors}"
    );
    assert!(
        printed.contains("ok: the peer has every message once, in order"),
        "{printed}"
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");

    // Alice got the browser's message live, from bob.
    let live = pb::Envelope::decode(alice.next_on("im/u/alice").await.as_slice()).unwrap();
    let Some(pb::envelope::Body::Chat(message)) = live.body else {
        panic!("not a chat message: {live:?}");
    };
    assert_eq!(
        (message.from.as_str(), text_of(&message)),
        ("bob", SENT_FROM_BROWSER)
    );

    // The browser acknowledged every page: a new device of bob's starts after alice's three
    // messages (only bob's own messages from the browser are new to it, and not counted; the
    // refused one was never stored).
    let mut phone = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    phone.subscribe("im/u/bob/#", 1).await;
    let digest = phone.digest("bob").await;
    let session = &digest.sessions["u/alice"];
    assert_eq!(
        (session.acked_seq, session.count, session.max_seq),
        (3, 0, 3 + 2 + BURST),
        "{digest:?}"
    );
}
