//! The Lua host against scripts written for each case (sandbox, limits, verdicts).

use std::collections::BTreeMap;
use std::io::Write;

use super::*;
use crate::config::{OnError, PolicySettings};

fn settings(dir: &tempfile::TempDir, scripts: &[&str]) -> PolicySettings {
    let paths = scripts
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let path = dir.path().join(format!("s{i}.lua"));
            std::fs::File::create(&path)
                .unwrap()
                .write_all(source.as_bytes())
                .unwrap();
            path
        })
        .collect();
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "darn\n坏蛋\n").unwrap();
    PolicySettings {
        scripts: paths,
        on_error: OnError::Deny,
        states: 2,
        memory_limit: 4 << 20,
        instruction_limit: 200_000,
        reload_interval: crate::config::Period::millis(0),
        words: BTreeMap::from([("default".to_string(), words)]),
        config: BTreeMap::from([(
            "greeting".to_string(),
            crate::config::ConfigValue::Str("hi".into()),
        )]),
        ..crate::config::Config::default().policy
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

async fn verdict(scripts: &[&str], text: &str) -> (Decision, PolicyStats) {
    let dir = tempfile::tempdir().unwrap();
    let policy = LuaPolicy::load(settings(&dir, scripts)).unwrap();
    let decision = policy.on_message(message(text)).await;
    (decision, policy.stats())
}

#[tokio::test]
async fn verdicts_chain_in_order() {
    let upper = "hooks = { on_message = function(m) return { text = m.text:upper() } end }";
    let deny_secret = r#"hooks = { on_message = function(m)
        if m.text:find("SECRET") then return false, "no secrets" end end }"#;
    let (decision, _) = verdict(&[upper, deny_secret], "a secret").await;
    assert_eq!(decision, Decision::Deny("no secrets".into()));
    let (decision, stats) = verdict(&[upper, deny_secret], "hello").await;
    assert_eq!(decision, Decision::Allow(Some("HELLO".into())));
    assert_eq!(stats.rewritten, 1);
    let allow_now = "hooks = { on_message = function() return true end }";
    let (decision, _) = verdict(&[allow_now, deny_secret], "SECRET").await;
    assert_eq!(decision, Decision::Allow(None));
}

#[tokio::test]
async fn a_script_writing_into_its_argument_does_not_reach_the_next() {
    let tamper =
        r#"hooks = { on_message = function(m) m.text = "tampered"; m.from = "mallory" end }"#;
    let check = r#"hooks = { on_message = function(m)
        if m.text ~= "hello" or m.from ~= "alice" then return false, "saw tampering" end end }"#;
    let (decision, _) = verdict(&[tamper, check], "hello").await;
    assert_eq!(decision, Decision::Allow(None));
}

#[tokio::test]
async fn helpers_words_config_and_log() {
    let script = r##"
        local greeting = config.greeting
        hooks = { on_message = function(m)
            log.info("checking " .. m.msg_id)
            assert(greeting == "hi")
            assert(not pcall(function() config.greeting = "x" end))
            local masked, n = words.mask(m.text, "#")
            if n > 0 then return { text = masked } end
        end }"##;
    let (decision, _) = verdict(&[script], "Darn 坏蛋!").await;
    assert_eq!(decision, Decision::Allow(Some("#### ##!".into())));
}

#[tokio::test]
async fn sandbox_escapes_are_errors() {
    for escape in [
        "os.execute('true')",
        "io.open('/etc/passwd')",
        "require('os')",
        "load('return 1')()",
        "dofile('/etc/passwd')",
        "debug.getinfo(1)",
        "string.dump(print)",
        "coroutine.create(function() end)",
    ] {
        let script = format!("hooks = {{ on_message = function() {escape} end }}");
        let (decision, stats) = verdict(&[&script], "x").await;
        assert!(
            matches!(decision, Decision::Deny(_)),
            "{escape}: {decision:?}"
        );
        assert_eq!(stats.errors, 1, "{escape}");
    }
}

#[tokio::test]
async fn limits_stop_runaway_scripts() {
    let forever = "hooks = { on_message = function() while true do end end }";
    let hog = "hooks = { on_message = function() local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(64) .. i end end }";
    let one_big_allocation = "hooks = { on_message = function() return #(('x'):rep(1e9)) > 0 end }";
    for script in [forever, hog, one_big_allocation] {
        let (decision, stats) = verdict(&[script], "x").await;
        assert!(matches!(decision, Decision::Deny(_)), "{decision:?}");
        assert_eq!(stats.errors, 1);
    }
    // The state is usable again after a limit hit.
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(&dir, &[forever]);
    config.states = 1;
    config.on_error = OnError::Allow;
    let policy = LuaPolicy::load(config).unwrap();
    for _ in 0..3 {
        assert_eq!(policy.on_message(message("x")).await, Decision::Allow(None));
    }
    assert_eq!(policy.stats().errors, 3);
}

#[tokio::test]
async fn bad_scripts_follow_on_error() {
    let syntax = "hooks = { on_message = function( end";
    let (decision, stats) = verdict(&[syntax], "x").await;
    assert!(matches!(decision, Decision::Deny(reason) if reason.contains("s0.lua")));
    // Counted when it failed to load, and again for the message it denied.
    assert_eq!(stats.errors, 2);
    let garbage = "hooks = { on_message = function() return 42 end }";
    let (decision, _) = verdict(&[garbage], "x").await;
    assert!(matches!(decision, Decision::Deny(_)));
    let bad_rewrite = "hooks = { on_message = function() return { from = 'mallory' } end }";
    let (decision, _) = verdict(&[bad_rewrite], "x").await;
    assert!(matches!(decision, Decision::Deny(_)));
}

#[tokio::test]
async fn reload_swaps_only_scripts_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(
        &dir,
        &["hooks = { on_message = function() return false, 'v1' end }"],
    );
    let path = config.scripts[0].clone();
    let policy = LuaPolicy::load(config).unwrap();
    assert_eq!(
        policy.on_message(message("x")).await,
        Decision::Deny("v1".into())
    );
    std::fs::write(
        &path,
        "hooks = { on_message = function() return false, 'v2' end }",
    )
    .unwrap();
    policy.reload().unwrap();
    assert_eq!(
        policy.on_message(message("x")).await,
        Decision::Deny("v2".into())
    );
    std::fs::write(&path, "hooks = {").unwrap();
    assert!(policy.reload().is_err());
    assert_eq!(
        policy.on_message(message("x")).await,
        Decision::Deny("v2".into())
    );
    assert_eq!(
        (policy.stats().reloads, policy.stats().failed_reloads),
        (1, 1)
    );
}

#[tokio::test]
async fn connect_and_subscribe_hooks() {
    let script = r#"hooks = {
        on_connect = function(c) if c.uid == "carol" then return false, "no carol" end end,
        on_subscribe = function(s) if s.filter:find("^secret/") then return false, "hidden" end end,
    }"#;
    let dir = tempfile::tempdir().unwrap();
    let policy = LuaPolicy::load(settings(&dir, &[script])).unwrap();
    let client = |uid: &str| ClientView {
        uid: uid.into(),
        client_id: "c".into(),
        username: Some(uid.into()),
        protocol: "5",
        clean_session: true,
        keep_alive: 30,
    };
    assert_eq!(
        policy.on_connect(client("carol")).await,
        Decision::Deny("no carol".into())
    );
    assert_eq!(
        policy.on_connect(client("bob")).await,
        Decision::Allow(None)
    );
    let subscription = |filter: &str| SubscribeView {
        uid: "bob".into(),
        client_id: "c".into(),
        filter: filter.into(),
        qos: 1,
    };
    assert!(matches!(
        policy.on_subscribe(subscription("secret/x")).await,
        Decision::Deny(_)
    ));
    assert_eq!(
        policy.on_subscribe(subscription("open/x")).await,
        Decision::Allow(None)
    );
}

#[tokio::test]
async fn shipped_scripts() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts");
    let config = PolicySettings {
        scripts: vec![root.join("policy.lua"), root.join("sensitive_words.lua")],
        on_error: OnError::Deny,
        states: 1,
        memory_limit: 8 << 20,
        instruction_limit: 1_000_000,
        reload_interval: crate::config::Period::millis(0),
        words: BTreeMap::from([
            ("default".to_string(), root.join("words/sensitive.txt")),
            ("blocked".to_string(), root.join("words/blocked.txt")),
        ]),
        config: BTreeMap::new(),
        ..crate::config::Config::default().policy
    };
    let policy = LuaPolicy::load(config).unwrap();
    let check = |text: &str| {
        let policy = &policy;
        let message = message(text);
        async move { policy.on_message(message).await }
    };
    assert_eq!(
        check("what the heck").await,
        Decision::Allow(Some("what the ****".into()))
    );
    assert_eq!(check("hello").await, Decision::Allow(None));
    assert_eq!(check("   ").await, Decision::Deny("empty message".into()));
    assert_eq!(
        check("FREE CRYPTO here").await,
        Decision::Deny("message contains a blocked word".into())
    );
    assert_eq!(
        check(&"x".repeat(5000)).await,
        Decision::Deny("text longer than 4000 characters".into())
    );
    assert_eq!(policy.stats().errors, 0);
}

/// The metered pattern functions give Lua 5.4's answers.
#[tokio::test]
async fn patterns_behave_like_lua() {
    let checks = r#"
        local function eq(a, b, what) if a ~= b then error(what .. ": " .. tostring(a) .. " ~= " .. tostring(b)) end end
        local function all(...) return table.concat({...}, ",") end
        eq(all(string.find("hello world", "o w")), "5,7", "find")
        eq(all(string.find("hello", "l", 1, true)), "3,3", "plain find")
        eq(all(string.find("a.b", ".", 1, true)), "2,2", "plain dot")
        eq(all(string.find("hello", "l", -2)), "4,4", "negative init")
        eq(string.find("hello", "xyz"), nil, "no match")
        eq(all(string.find("hello", "")), "1,0", "empty pattern")
        eq(all(string.find("key = value", "(%w+)%s*=%s*(%w+)")), "1,11,key,value", "find captures")
        eq(all(("  trim me  "):match("^%s*(.-)%s*$")), "trim me", "trim")
        eq(all(("2024-01-31"):match("(%d+)-(%d+)-(%d+)")), "2024,01,31", "dates")
        eq(all(("hello"):match("()ll()")), "3,5", "position captures")
        eq(("f(a(b)c)d"):match("%b()"), "(a(b)c)", "balance")
        eq(("THE (quick) fox"):find("%f[%a]%a+%f[%A]"), 1, "frontier")
        eq(("abc123"):match("^[%a]+"), "abc", "class set")
        eq(("abc123"):match("[^%a]+"), "123", "negated set")
        eq(("x-y"):match("[a-z%-]+"), "x-y", "escaped dash in set")
        eq(("aaab"):match("a-b"), "aaab", "lazy")
        eq(("aaab"):match("a*"), "aaa", "greedy")
        eq(("b"):match("a?b"), "b", "optional")
        eq(("hello hello"):match("(h%w+) %1"), "hello", "back reference")
        eq(("bob@example.com"):match("^[%w_%-%.@]+$"), "bob@example.com", "recipient")
        local words = {}
        for w in ("one two  three"):gmatch("%a+") do words[#words + 1] = w end
        eq(table.concat(words, "|"), "one|two|three", "gmatch")
        local pairs_ = {}
        for k, v in ("a=1, b=2"):gmatch("(%w+)=(%w+)") do pairs_[#pairs_ + 1] = k .. v end
        eq(table.concat(pairs_, "|"), "a1|b2", "gmatch captures")
        eq(all(("hello world"):gsub("o", "0")), "hell0 w0rld,2", "gsub")
        eq(all(("hello world"):gsub("(%w+)", "<%1>")), "<hello> <world>,2", "gsub %1")
        eq(all(("hello world"):gsub("%w+", { hello = "HI" })), "HI world,2", "gsub table")
        eq(all(("abc"):gsub("%w", function(c) return c:upper() .. "." end)), "A.B.C.,3", "gsub function")
        eq(all(("abc"):gsub("", "-")), "-a-b-c-,4", "gsub empty")
        eq(all(("aaa"):gsub("a", "b", 2)), "bba,2", "gsub max")
        eq(all(("hello"):gsub("^h", "H")), "Hello,1", "gsub anchored")
        eq(all(("50%"):gsub("%%", "%%%%")), "50%%,1", "gsub percent")
        eq(pcall(string.rep), false, "sanity")
        local ok = pcall(string.find, "x", "[a")
        eq(ok, false, "malformed set")
        ok = pcall(string.gsub, "x", "x", "%2")
        eq(ok, false, "invalid capture index")
        hooks = { on_message = function() return true end }
    "#;
    let (decision, stats) = verdict(&[checks], "x").await;
    assert_eq!(decision, Decision::Allow(None), "{stats:?}");
    assert_eq!(stats.errors, 0);
}

/// Calls that come in after a pause: the message fields are built under the new call's meter,
/// never under the last call's long-past deadline (seen as a rare denial under load).
#[tokio::test]
async fn calls_after_a_pause_are_not_charged_for_it() {
    let dir = tempfile::tempdir().unwrap();
    // Instructions per call that shift where the meter's periodic check falls each time.
    let script =
        "hooks = { on_message = function(m) local n = 0 for i = 1, 37 do n = n + i end end }";
    let mut config = settings(&dir, &[script]);
    config.states = 1;
    config.call_timeout = crate::config::Period::millis(2);
    let policy = LuaPolicy::load(config).unwrap();
    for _ in 0..300 {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        assert_eq!(policy.on_message(message("x")).await, Decision::Allow(None));
    }
}
