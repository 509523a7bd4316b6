//! Hostile and careless Lua scripts loaded into a real mqtt-im: none can hold the broker or
//! switch another script off. After each, under both `on_error` modes, a fresh client gets
//! its CONNACK, a chat answer and a pass-through message within a second. The freeze cases
//! (pcall loops, pattern bombs, finalizers, top-level loops) hung the broker before.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use mqtt_im::config::{Config, OnError};

const SOON: Duration = Duration::from_secs(1);

/// (file name, source) of scripts that tried to freeze or break the broker.
const HOSTILE: [(&str, &str); 9] = [
    (
        "pcall_loop.lua",
        "hooks = { on_message = function() while true do pcall(function() while true do end end) end end }",
    ),
    (
        "xpcall_loop.lua",
        "hooks = { on_message = function() while true do xpcall(function() while true do end end, function(e) return e end) end end }",
    ),
    (
        "pattern_bomb.lua",
        r#"hooks = { on_message = function() return string.find(("a"):rep(300), ".-.-.-.-b") end }"#,
    ),
    (
        "method_bomb.lua",
        r#"hooks = { on_message = function() local s = ("a"):rep(300) return s:match(".-.-.-.-b") end }"#,
    ),
    (
        "finalizer.lua",
        "hooks = { on_message = function() setmetatable({}, { __gc = function() while true do end end }) end }",
    ),
    (
        "memory_pcall.lua",
        r#"hooks = { on_message = function() while true do pcall(function() local t = {} while true do t[#t + 1] = ("x"):rep(65536) end end) end end }"#,
    ),
    (
        "gsub_callback.lua",
        r#"hooks = { on_message = function() return ("x"):rep(100):gsub(".", function() while true do end end) end }"#,
    ),
    (
        "top_level_loop.lua",
        "while true do pcall(function() while true do end end) end",
    ),
    (
        "top_level_finalizer.lua",
        "setmetatable({}, { __gc = function() while true do end end }) hooks = {}",
    ),
];

fn with_scripts(paths: Vec<PathBuf>, on_error: OnError) -> impl FnOnce(&mut Config) {
    move |config| {
        config.policy.scripts = paths;
        config.policy.on_error = on_error;
        config.policy.call_timeout = mqtt_im::config::Period::millis(50);
    }
}

/// The CONNACK code a fresh 3.1.1 client gets (0 accepted).
async fn connack(broker: &TestBroker, client_id: &str) -> u8 {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", broker.addr.port());
    options.set_credentials("carol", "pw");
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    loop {
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => return ack.code as u8,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return code as u8,
            Err(e) => panic!("no CONNACK: {e}"),
        }
    }
}

/// A fresh client connects, gets an answer to a chat and a pass-through message, all within
/// a second; under `deny` with a script that did not load, its CONNECT is refused at once.
async fn still_serving(broker: &TestBroker, name: &str, connect_refused: bool) {
    let code = tokio::time::timeout(SOON, connack(broker, &format!("probe-{name}")))
        .await
        .unwrap_or_else(|_| panic!("{name}: no CONNACK within a second"));
    if connect_refused {
        assert_eq!(code, 5, "{name}: not authorized");
        return;
    }
    assert_eq!(code, 0, "{name}");
    tokio::time::timeout(SOON, async {
        let mut carol = Client::v5(broker.addr, &format!("carol-{name}"), "carol").await;
        carol.subscribe("t/#", 1).await;
        carol.publish("t/x", 1, b"ok".to_vec()).await;
        assert_eq!(carol.next_on("t/x").await, b"ok".to_vec(), "{name}");
        let _ = carol
            .publish_answered("im/u/bob", chat(name, "bob", "hi", false))
            .await;
    })
    .await
    .unwrap_or_else(|_| panic!("{name}: not served within a second"));
}

backend_tests! {
/// Every hostile script under both modes: the message it judges gets an answer (deny, or
/// allow under `allow`), the failure is counted, and the broker keeps serving.
async fn hostile_scripts_cannot_hold_the_broker(backend: TestBackend) {
    for on_error in [OnError::Deny, OnError::Allow] {
        for (name, source) in HOSTILE {
            let dir = tempfile::tempdir().unwrap();
            let path = script(dir.path(), name, source);
            let broker =
                TestBroker::start_with_on(backend.clone(), with_scripts(vec![path], on_error))
                    .await;
            let top_level = name.starts_with("top_level");
            let refused = top_level && on_error == OnError::Deny;
            if !refused {
                let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
                let answered = tokio::time::timeout(
                    SOON,
                    alice.publish_answered("im/u/bob", chat("x", "bob", "hi", false)),
                )
                .await;
                let (code, reason) = answered.unwrap_or_else(|_| panic!("{name}: no PUBACK"));
                match on_error {
                    OnError::Deny if !top_level => {
                        assert_eq!(code, 0x87, "{name}");
                        assert_eq!(
                            reason.as_deref(),
                            Some(format!("denied by policy: policy error in {name}").as_str())
                        );
                    }
                    _ => assert_eq!(code, 0, "{name} under {on_error:?}"),
                }
            }
            let failures = broker.policy.failures();
            assert!(
                failures.iter().any(|(script, _, n)| script == name && *n > 0),
                "{name}: {failures:?}"
            );
            still_serving(&broker, name, refused).await;
            broker.stop().await;
        }
    }
}

/// Scripts that try to switch the shipped filter off — replacing `words.find`/`words.mask`,
/// `string` functions, the string metatable, `_G` entries — before and after it: it still
/// masks and blocks, and the tampering scripts' attempts fail only for themselves.
async fn no_script_can_switch_another_off(backend: TestBackend) {
    let tamper = r#"
        local attempts = {
          function() words.find = function() return {} end end,
          function() words.mask = function(t) return t, 0 end end,
          function() string.find = function() return nil end end,
          function() string.lower = function(s) return s end end,
          function() getmetatable("").__index = {} end,
          function() rawset(words, "find", nil) end,
          function() _G.words = { find = function() return {} end, has = function() return false end } end,
          function() utf8.len = function() return 0 end end,
          function() config.mask_char = "" end,
        }
        for _, attempt in ipairs(attempts) do pcall(attempt) end
        hooks = { on_message = function(msg) return nil end }
    "#;
    let dir = tempfile::tempdir().unwrap();
    let before = script(dir.path(), "tamper_before.lua", tamper);
    let after = script(dir.path(), "tamper_after.lua", tamper);
    let broker = TestBroker::start_with_on(backend, move |config| {
        shipped_policy(config);
        let shipped = std::mem::take(&mut config.policy.scripts);
        config.policy.scripts = [vec![before], shipped, vec![after]].concat();
    })
    .await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    let (code, reason) = alice
        .publish_answered("im/u/bob", chat("b", "bob", "free crypto for you", false))
        .await;
    assert_eq!(code, 0x87);
    assert!(reason.unwrap().contains("blocked word"));
    assert_eq!(alice.publish_acked("im/u/bob", chat("m", "bob", "oh darn, 坏蛋", false)).await, 0);
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    assert_eq!(page.messages.len(), 1);
    assert_eq!(text_of(&page.messages[0]), "oh ****, **");
    assert!(broker.policy.failures().is_empty(), "{:?}", broker.policy.failures());
}

/// The word filter sees through disguises: full-width letters, zero-width characters,
/// Cyrillic look-alikes and odd spaces; a longer word containing a listed one is left alone.
async fn the_word_filter_normalizes(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, shipped_policy).await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    for (i, text) in ["ＦＲＥＥ ＣＲＹＰＴＯ", "free\u{200B} crypto", "fr\u{0435}e crypto", "free\u{00A0}\u{00A0}crypto"]
        .into_iter()
        .enumerate()
    {
        let (code, _) = alice
            .publish_answered("im/u/bob", chat(&format!("b{i}"), "bob", text, false))
            .await;
        assert_eq!(code, 0x87, "{text:?} passed");
    }
    for (i, text) in ["ＤＡＲＮ it", "坏\u{200B}蛋", "d\u{0430}rn", "heckler"].into_iter().enumerate() {
        let id = format!("m{i}");
        assert_eq!(alice.publish_acked("im/u/bob", chat(&id, "bob", text, false)).await, 0);
    }
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    let page = page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await);
    let mut texts: Vec<&str> = page.messages.iter().map(text_of).collect();
    texts.reverse();
    assert_eq!(texts, vec!["**** it", "***", "****", "heckler"]);
}

/// Under `allow`, a failing script is skipped and the chain goes on with the rewrites made
/// before it; under `deny` the message is refused.
async fn on_error_allow_skips_only_the_failing_script(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let first = script(dir.path(), "first.lua", "hooks = { on_message = function(m) return { text = m.text .. '+1' } end }");
    let broken = script(dir.path(), "broken.lua", "hooks = { on_message = function(m) error('boom') end }");
    let third = script(dir.path(), "third.lua", "hooks = { on_message = function(m) return { text = m.text .. '+3' } end }");
    // One receiver per round: both rounds share the backend's database.
    let rounds = [(OnError::Allow, Some("hi+1+3"), "bob"), (OnError::Deny, None, "carol")];
    for (on_error, expected, peer) in rounds {
        let paths = vec![first.clone(), broken.clone(), third.clone()];
        let broker = TestBroker::start_with_on(backend.clone(), with_scripts(paths, on_error)).await;
        let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
        let topic = format!("im/u/{peer}");
        let (code, _) = alice.publish_answered(&topic, chat("x", peer, "hi", false)).await;
        let mut receiver = Client::v4(broker.addr, &format!("{peer}-phone"), peer, 30).await;
        let page = page(&receiver.ask(peer, pull("p", "u/alice", 10, None)).await);
        match expected {
            Some(text) => {
                assert_eq!(code, 0);
                assert_eq!(text_of(&page.messages[0]), text);
            }
            None => {
                assert_eq!(code, 0x87);
                assert!(page.messages.is_empty());
            }
        }
        broker.stop().await;
    }
}

/// What scripts send out is bounded and clean: a huge deny reason is cut to 256 bytes (the
/// MQTT 5 client still gets its PUBACK), a reason-less denial names the file, not the path,
/// and a rewrite past `im.max_message_bytes` is refused and not stored.
async fn script_output_is_bounded_and_clean(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let huge = script(dir.path(), "huge.lua", r#"hooks = { on_message = function(m) if m.text == "huge" then return false, ("why\n"):rep(30000) end end }"#);
    let bare = script(dir.path(), "bare.lua", r#"hooks = { on_message = function(m) if m.text == "bare" then return false end end }"#);
    let big = script(dir.path(), "big.lua", r#"hooks = { on_message = function(m) if m.text == "big" then return { text = ("x"):rep(3000000) } end end }"#);
    let paths = vec![huge, bare, big];
    let broker = TestBroker::start_with_on(backend, move |config| {
        config.policy.scripts = paths;
        config.policy.memory_limit = 32 << 20;
    })
    .await;
    let mut alice = Client::v5(broker.addr, "alice-5", "alice").await;
    let (code, reason) = alice.publish_answered("im/u/bob", chat("h", "bob", "huge", false)).await;
    assert_eq!(code, 0x87);
    let reason = reason.unwrap();
    assert!(reason.len() <= 256, "{} bytes", reason.len());
    assert!(!reason.contains('\n'));
    let (code, reason) = alice.publish_answered("im/u/bob", chat("b", "bob", "bare", false)).await;
    assert_eq!(code, 0x87);
    assert_eq!(reason.unwrap(), "denied by policy: denied by bare.lua");
    let (code, _) = alice.publish_answered("im/u/bob", chat("g", "bob", "big", false)).await;
    assert_eq!(code, 0x97, "too large");
    let mut bob = Client::v4(broker.addr, "bob-phone", "bob", 30).await;
    assert!(page(&bob.ask("bob", pull("p", "u/alice", 10, None)).await).messages.is_empty());
}
}

/// `check-config` loads every script: a syntax error, a misspelt hook and a non-function
/// hook fail it with the script, the line and the reason.
#[test]
fn check_config_loads_every_script() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "syntax.lua",
            "hooks = { on_message = function( end",
            "syntax.lua:1:",
        ),
        (
            "misspelt.lua",
            "local x = 1\nhooks = {\n  on_mesage = function() end }",
            "misspelt.lua:3: hooks.on_mesage is not a hook",
        ),
        (
            "value.lua",
            "hooks = {\n on_message = 42 }",
            "value.lua:2: hooks.on_message must be a function",
        ),
        ("top.lua", "while true do end", "instruction budget"),
    ];
    for (name, source, expected) in cases {
        let path = script(dir.path(), name, source);
        let output = Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .arg("check-config")
            .env("MQTT_IM__POLICY__SCRIPTS", &path)
            .env("MQTT_IM__STORE__PATH", dir.path().join("x.db"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            !stderr.contains(&*dir.path().to_string_lossy()) || stderr.contains("cannot read"),
            "{name} names the path: {stderr}"
        );
    }
}

/// `mqtt-im policy test` runs sample messages through the shipped scripts and prints each
/// verdict; an invalid sample makes it fail.
#[test]
fn policy_test_command_prints_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    std::fs::write(
        &samples,
        concat!(
            r#"{"from": "alice", "to": "bob", "text": "hello"}"#,
            "\n",
            r#"{"from": "alice", "to": "bob", "text": "oh heck"}"#,
            "\n",
            r#"{"from": "alice", "to": "bob", "text": "free crypto"}"#,
            "\n",
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .args(["policy", "test", "--config", "examples/mqtt-im.toml"])
            .arg(&samples)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let output = run();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            "1: allow",
            r#"2: rewrite "oh ****""#,
            r#"3: deny "message contains a blocked word""#,
        ]
    );
    std::fs::write(&samples, "{\"to\": \"bob\"}\n").unwrap();
    assert!(!run().status.success());
}
