//! The Lua hooks a deployment brings for its non-IM traffic and its logins, over real
//! connections: `on_publish` judges pass-through publishes (in arrival order), `on_auth` is a
//! link of the authentication chain.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use mqtt_im::config::ProviderSettings;

const HOOKS: &str = r#"
hooks = {
  on_publish = function(p)
    if p.topic:find("^blocked/") then return false, "blocked topic" end
    if p.payload:find("forbidden", 1, true) then return false, "forbidden payload" end
    if p.retain and p.topic:find("^volatile/") then return false, "no retained volatile" end
  end,
  on_auth = function(c)
    if c.username == "scripted" and c.password == "open sesame" then
      return true, "scripted-uid"
    end
    if c.username == "blocked" then return false, "go away" end
  end,
}
"#;

async fn broker(dir: &std::path::Path) -> TestBroker {
    let path = script(dir, "hooks.lua", HOOKS);
    TestBroker::start_with(move |c| {
        c.policy.scripts = vec![path];
        c.auth.providers = vec![ProviderSettings::Lua, ProviderSettings::Users];
    })
    .await
}

#[tokio::test]
async fn on_publish_judges_pass_through_publishes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path()).await;
    let mut watcher = Client::v5(broker.addr, "watcher", "bob").await;
    assert_eq!(watcher.subscribe("#", 1).await, vec![1]);
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    let (code, reason) = v5.publish_answered("blocked/x", b"1".to_vec()).await;
    assert_eq!((code, reason.as_deref()), (0x87, Some("blocked topic")));
    let (code, reason) = v5
        .publish_answered("open/x", b"a forbidden word".to_vec())
        .await;
    assert_eq!((code, reason.as_deref()), (0x87, Some("forbidden payload")));
    // Pipelined, mixed: the allowed ones arrive in the order they were sent.
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    for i in 0..50 {
        let topic = if i % 5 == 0 { "blocked/t" } else { "open/t" };
        v4.publish(topic, 1, format!("{i}").into_bytes()).await;
    }
    v4.publish_retain("volatile/state", 1, true, b"r".to_vec())
        .await;
    let mut acked = 0;
    while acked < 51 {
        if let Seen::PubAck { reason, .. } = v4.next().await {
            assert_eq!(reason, 0, "3.1.1: acknowledged, refused or not");
            acked += 1;
        }
    }
    let mut arrived = Vec::new();
    while arrived.len() < 40 {
        let payload = watcher.next_on("open/t").await;
        arrived.push(String::from_utf8(payload).unwrap().parse::<u32>().unwrap());
    }
    let expected: Vec<u32> = (0..50).filter(|i| i % 5 != 0).collect();
    assert_eq!(arrived, expected);
    assert!(watcher
        .quiet_for(Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test]
async fn on_auth_is_a_link_of_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path()).await;
    let login = |user: &'static str, password: &'static str| {
        raw_connect(broker.addr, true, "probe", true, Some((user, password)))
    };
    assert_eq!(login("scripted", "open sesame").await.code, 0);
    assert_eq!(
        login("scripted", "wrong").await.code,
        0x86,
        "nil: users table, unknown"
    );
    assert_eq!(login("blocked", "x").await.code, 0x86);
    assert_eq!(
        login("alice", "pw").await.code,
        0,
        "nil: the users table decides"
    );
    let mut options = rumqttc::v5::MqttOptions::new("s-1", "127.0.0.1", broker.addr.port());
    options.set_credentials("scripted", "open sesame");
    let mut scripted = Client::v5_with(options).await;
    assert_eq!(scripted.subscribe("im/u/scripted-uid/#", 1).await, vec![1]);
}

/// A SUBSCRIBE whose `on_subscribe` takes a while: the connection keeps reading and
/// answering (a PINGREQ behind it is answered first), while what the client sends after the
/// SUBSCRIBE still takes effect after it (its own publish on the new subscription comes
/// back to it).
#[tokio::test]
async fn a_slow_on_subscribe_never_stops_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "slow.lua",
        "hooks = { on_subscribe = function(s) local x = 0 for i = 1, 20000000 do x = x + i end end }",
    );
    let broker = TestBroker::start_with(move |c| {
        c.policy.scripts = vec![path];
        c.policy.instruction_limit = 1_000_000_000;
        c.policy.call_timeout = mqtt_im::config::Period::millis(10_000);
    })
    .await;
    let mut stream = raw_connect(broker.addr, false, "slow-sub", true, Some(("bob", "pw")))
        .await
        .stream;
    // SUBSCRIBE echo/# (pkid 1, QoS 1), PUBLISH echo/1 "x" at QoS 0, PINGREQ: in one write.
    let mut out = vec![0x82, 11, 0, 1, 0, 6];
    out.extend_from_slice(b"echo/#");
    out.push(1);
    out.extend_from_slice(&[0x30, 9, 0, 6]);
    out.extend_from_slice(b"echo/1x");
    out.extend_from_slice(&[0xC0, 0]);
    stream.write_all(&out).await.unwrap();
    let mut answers = vec![0u8; 2 + 5 + 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut answers))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answers[..2], &[0xD0, 0], "PINGRESP first: {answers:?}");
    assert_eq!(&answers[2..7], &[0x90, 3, 0, 1, 1], "then the SUBACK");
    // rumqttd 0.20 delivers at the subscription's QoS (1 here), not the publish's.
    assert_eq!(answers[7] & 0xF0, 0x30, "then its own publish");
    let mut publish = vec![0u8; usize::from(answers[8])];
    stream.read_exact(&mut publish).await.unwrap();
    assert!(publish.starts_with(b"\0\x06echo/1") && publish.ends_with(b"x"));
}
