//! The Lua policy over real MQTT connections: masking, denial with a reason (MQTT 5 and
//! 3.1.1), validation, chained rewrites, misbehaving scripts, connect/subscribe hooks and hot
//! reload.

use crate::common::*;
use mqtt_im::config::OnError;
use mqtt_im::wire::pb;

async fn received_text(broker: &TestBroker) -> Vec<String> {
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 50, None)).await);
    page.messages
        .iter()
        .map(|m| text_of(m).to_owned())
        .collect()
}

backend_tests! {
/// A sensitive word arrives masked; a blocked one is denied with its reason (MQTT 5 PUBACK
/// reason string; 3.1.1 error frame); a validation failure is denied; nothing denied is stored.
async fn shipped_scripts_mask_deny_and_validate(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend.clone(), shipped_policy).await;
    let mut v5 = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        v5.publish_acked("im/u/bob", chat("m1", "bob", "Oh heck, 坏蛋", false))
            .await,
        0
    );
    let (code, reason) = v5
        .publish_answered("im/u/bob", chat("m2", "bob", "free crypto for you", false))
        .await;
    assert_eq!(code, 0x87);
    assert!(reason.unwrap().contains("blocked word"));
    let mut v4 = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    v4.subscribe("im/u/alice/#", 1).await;
    let _ = v4.digest("alice").await;
    v4.publish("im/u/bob", 1, chat("m3", "bob", "  ", false))
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert_eq!(error.code, pb::ErrorCode::Denied as i32);
    assert!(error.message.contains("empty message"), "{}", error.message);
    v4.publish("im/u/bob", 1, chat("m4", "bob", "刷单 now", false))
        .await;
    let error = v4.response("alice").await.error.unwrap();
    assert!(error.message.contains("blocked word"), "{}", error.message);
    assert_eq!(
        received_text(&broker).await,
        vec!["Oh ****, **".to_string()]
    );
    let stats = broker.policy.stats();
    assert_eq!((stats.denied, stats.rewritten, stats.errors), (3, 1, 0));
}
}

backend_tests! {
/// A rewrite is not approval: the next script judges the rewritten text.
async fn rewrite_then_next_script_decides(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let upper = script(
        dir.path(),
        "upper.lua",
        "hooks = { on_message = function(m) return { text = m.text:upper() } end }",
    );
    let judge = script(
        dir.path(),
        "judge.lua",
        r#"hooks = { on_message = function(m)
             if m.text:find("SHOUT") then return false, "saw " .. m.text end end }"#,
    );
    let broker = TestBroker::start_with_on(backend.clone(), |c| c.policy.scripts = vec![upper, judge]).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    let (code, reason) = alice
        .publish_answered("im/u/bob", chat("a", "bob", "shout", false))
        .await;
    assert_eq!(code, 0x87);
    assert_eq!(reason.as_deref(), Some("denied by policy: saw SHOUT"));
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("b", "bob", "quiet", false))
            .await,
        0
    );
    assert_eq!(received_text(&broker).await, vec!["QUIET".to_string()]);
}
}

backend_tests! {
/// Infinite loops, unbounded allocation and sandbox escapes follow on_error (deny here): the
/// message is refused, nothing is stored, the broker keeps serving.
async fn misbehaving_scripts_follow_on_error(backend: TestBackend) {
    let cases = [
        ("loop.lua", "hooks = { on_message = function() while true do end end }"),
        (
            "hog.lua",
            "hooks = { on_message = function() local t = {} while true do t[#t + 1] = ('x'):rep(1024) end end }",
        ),
        ("exec.lua", "hooks = { on_message = function() os.execute('touch /tmp/pwned') end }"),
        ("io.lua", "hooks = { on_message = function() return io.open('/etc/passwd') end }"),
    ];
    for (name, source) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), name, source);
        let broker = TestBroker::start_with_on(backend.clone(), |c| c.policy.scripts = vec![path]).await;
        let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
        let (code, reason) = alice
            .publish_answered("im/u/bob", chat("x", "bob", "hi", false))
            .await;
        assert_eq!(code, 0x87, "{name}");
        let reason = reason.unwrap();
        let expected = format!("denied by policy: policy error in {name}");
        assert_eq!(reason, expected, "no server path is revealed");
        assert_eq!(broker.policy.stats().errors, 1, "{name}");
        assert!(received_text(&broker).await.is_empty(), "{name}");
        // Still serving: pass-through traffic works.
        alice.subscribe("t/#", 1).await;
        alice.publish("t/x", 1, b"ok".to_vec()).await;
        assert_eq!(alice.next_on("t/x").await, b"ok".to_vec(), "{name}");
    }
}
}

backend_tests! {
/// With on_error = allow, a failing script lets the message through (and is counted).
async fn on_error_allow_lets_messages_through(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "boom.lua",
        "hooks = { on_message = function() error('boom') end }",
    );
    let broker = TestBroker::start_with_on(backend.clone(), |c| {
        c.policy.scripts = vec![path];
        c.policy.on_error = OnError::Allow;
    })
    .await;
    let mut alice = Client::v4(broker.addr, "alice-4", "alice", 30).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("x", "bob", "hi", false))
            .await,
        0
    );
    assert_eq!(received_text(&broker).await, vec!["hi".to_string()]);
    assert_eq!(broker.policy.stats().errors, 1);
}
}

backend_tests! {
/// on_connect can refuse a client after the broker's own auth; on_subscribe guards non-IM
/// topic filters.
async fn connect_and_subscribe_hooks_over_mqtt(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "acl.lua",
        r#"hooks = {
             on_connect = function(c) if c.uid == "carol" then return false, "carol is suspended" end end,
             on_subscribe = function(s) if s.filter:find("^secret") then return false, "hidden" end end,
           }"#,
    );
    let broker = TestBroker::start_with_on(backend.clone(), |c| c.policy.scripts = vec![path]).await;
    let mut options = rumqttc::MqttOptions::new("carol-1", "127.0.0.1", broker.addr.port());
    options.set_credentials("carol", "pw");
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    assert!(events.poll().await.is_err(), "carol must be refused");
    let mut bob = Client::v4(broker.addr, "bob-1", "bob", 30).await;
    assert_eq!(bob.subscribe("secret/#", 1).await, vec![0x80]);
    assert_eq!(bob.subscribe("public/#", 1).await, vec![1]);
    let mut bob5 = Client::v5(broker.addr, "bob-5", "bob").await;
    assert_eq!(bob5.subscribe("secret/x", 1).await, vec![0x87]);
}
}

backend_tests! {
/// Editing a script switches behaviour without a restart; a broken edit keeps the old one.
async fn hot_reload_switches_and_survives_a_broken_edit(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "gate.lua",
        "hooks = { on_message = function() return false, 'closed' end }",
    );
    let watched = path.clone();
    let broker = TestBroker::start_with_on(backend.clone(), |c| {
        c.policy.scripts = vec![watched];
        c.policy.reload_interval = mqtt_im::config::Period::millis(50);
    })
    .await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("1", "bob", "a", false))
            .await,
        0x87
    );
    std::fs::write(&path, "hooks = { on_message = function() return true end }").unwrap();
    wait_for(|| broker.policy.stats().reloads == 1).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("2", "bob", "b", false))
            .await,
        0
    );
    std::fs::write(&path, "hooks = { on_message = function( end").unwrap();
    wait_for(|| broker.policy.stats().failed_reloads == 1).await;
    assert_eq!(
        alice
            .publish_acked("im/u/bob", chat("3", "bob", "c", false))
            .await,
        0
    );
    assert_eq!(
        received_text(&broker).await,
        vec!["c".to_string(), "b".to_string()]
    );
}
}
