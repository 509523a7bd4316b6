//! Credentials as teams keep them, over real connections: hashed users in the config
//! (argon2id from `mqtt-im passwd`, bcrypt, pbkdf2-sha512), a Mosquitto password file
//! (written by `mosquitto_passwd` when installed) re-read on change and on SIGHUP, and the
//! chain's order; refusals are counted by reason.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mqtt_im::config::ProviderSettings;
use std::io::Write;

/// The CONNACK codes for a login over 3.1.1 and MQTT 5.
async fn codes(broker: &TestBroker, user: &str, password: &str) -> (u8, u8) {
    let login = Some((user, password));
    let v4 = raw_connect(broker.addr, false, "auth-v4", true, login)
        .await
        .code;
    let v5 = raw_connect(broker.addr, true, "auth-v5", true, login)
        .await
        .code;
    (v4, v5)
}

const ACCEPTED: (u8, u8) = (0, 0);
const BAD_PASSWORD: (u8, u8) = (4, 0x86);

/// `mqtt-im passwd USER` with `password` on stdin: the TOML line's hash.
fn passwd(user: &str, password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["passwd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let line = String::from_utf8(output.stdout).unwrap();
    let (name, hash) = line.trim().split_once(" = ").unwrap();
    assert_eq!(name, format!("{user:?}"));
    hash.trim_matches('"').to_owned()
}

/// A pbkdf2-sha512 PHC string, as Python's passlib or Django-style tools write them.
fn pbkdf2_sha512(password: &str) -> String {
    let salt = b"0123456789abcdef";
    let rounds = 1000;
    let mut key = [0u8; 64];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        std::num::NonZeroU32::new(rounds).unwrap(),
        salt,
        password.as_bytes(),
        &mut key,
    );
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    format!(
        "$pbkdf2-sha512$i={rounds},l=64${}${}",
        b64.encode(salt),
        b64.encode(key)
    )
}

/// Users whose passwords are stored as argon2id, bcrypt and pbkdf2-sha512 get in with the
/// right password only; clear text is not accepted without `plaintext = true`.
#[tokio::test]
async fn hashed_users_table() {
    let argon = passwd("ann", "s3cret ann");
    assert!(argon.starts_with("$argon2id$"));
    let bcrypt = bcrypt::hash("s3cret ben", 6).unwrap();
    let pbkdf2 = pbkdf2_sha512("s3cret cy");
    let broker = TestBroker::start_with(|c| {
        c.auth.plaintext = false;
        c.auth.users.clear();
        c.auth.users.insert("ann".into(), argon);
        c.auth.users.insert("ben".into(), bcrypt);
        c.auth.users.insert("cy".into(), pbkdf2);
        c.listeners.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    assert_eq!(codes(&broker, "ann", "s3cret ann").await, ACCEPTED);
    assert_eq!(codes(&broker, "ben", "s3cret ben").await, ACCEPTED);
    assert_eq!(codes(&broker, "cy", "s3cret cy").await, ACCEPTED);
    assert_eq!(codes(&broker, "ann", "s3cret ben").await, BAD_PASSWORD);
    assert_eq!(codes(&broker, "nobody", "x").await, BAD_PASSWORD);
    let v4 = raw_connect(broker.addr, false, "anon", true, None)
        .await
        .code;
    assert_eq!(v4, 5, "anonymous is not authorized");
    let (_, metrics) = http_get(broker.metrics.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("mqtt_im_auth_failures_total{reason=\"bad_credentials\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("mqtt_im_auth_failures_total{reason=\"not_authorized\"} 1"));

    let mut config = crate::common::config(broker.dir.path(), &TestBackend::Embedded);
    config.auth.plaintext = false;
    let refused = mqtt_im::Server::bind(config).await;
    let error = refused.err().unwrap().to_string();
    assert!(error.contains("auth.users.alice"), "{error}");
    assert!(
        !error.contains("pw\""),
        "the password is not echoed: {error}"
    );
}

/// Writes a Mosquitto password file: with `mosquitto_passwd` when installed (the real
/// tool), else with `$7$` and `$6$` hashes computed here the way it computes them.
fn write_password_file(path: &Path, users: &[(&str, &str)]) {
    let tool = Command::new("mosquitto_passwd").arg("-h").output().is_ok();
    let _ = std::fs::remove_file(path);
    if tool {
        for (i, (user, password)) in users.iter().enumerate() {
            let mut command = Command::new("mosquitto_passwd");
            if i == 0 {
                command.arg("-c");
            }
            if i % 2 == 1 {
                command.args(["-H", "sha512"]);
            }
            let status = command.arg("-b").arg(path).args([user, password]).status();
            assert!(status.unwrap().success());
        }
        return;
    }
    let mut text = String::from("# written by the test\n");
    for (i, (user, password)) in users.iter().enumerate() {
        let salt = [i as u8 + 1; 12];
        let line = if i % 2 == 1 {
            let mut context = ring::digest::Context::new(&ring::digest::SHA512);
            context.update(password.as_bytes());
            context.update(&salt);
            let digest = context.finish();
            format!(
                "{user}:$6${}${}",
                STANDARD.encode(salt),
                STANDARD.encode(digest)
            )
        } else {
            let mut key = [0u8; 64];
            ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                std::num::NonZeroU32::new(101).unwrap(),
                &salt,
                password.as_bytes(),
                &mut key,
            );
            format!(
                "{user}:$7$101${}${}",
                STANDARD.encode(salt),
                STANDARD.encode(key)
            )
        };
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// The chain `users` then `password_file`: the config's users first, then the file's
/// (`$7$` and `$6$`); a changed file is picked up without a restart, and a broken one keeps
/// the last good version.
#[tokio::test]
async fn mosquitto_password_file_after_the_users_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    write_password_file(&file, &[("dave", "dave pw"), ("erin", "erin:pw")]);
    let path = file.clone();
    let broker = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            ProviderSettings::Users,
            ProviderSettings::PasswordFile { path },
        ];
        c.auth.reload_interval = mqtt_im::config::Period::millis(50);
    })
    .await;
    assert_eq!(codes(&broker, "alice", "pw").await, ACCEPTED);
    assert_eq!(codes(&broker, "dave", "dave pw").await, ACCEPTED);
    assert_eq!(codes(&broker, "erin", "erin:pw").await, ACCEPTED);
    assert_eq!(codes(&broker, "dave", "erin:pw").await, BAD_PASSWORD);
    // alice is the users table's: the file is not asked, whatever it says.
    assert_eq!(codes(&broker, "alice", "dave pw").await, BAD_PASSWORD);
    let mut dave = Client::v5_with(options(&broker, "dave-phone", "dave", "dave pw")).await;
    assert_eq!(dave.subscribe("im/u/dave/#", 1).await, vec![1]);

    write_password_file(&file, &[("dave", "new pw"), ("fay", "fay pw")]);
    eventually(|| async { codes(&broker, "fay", "fay pw").await == ACCEPTED }).await;
    assert_eq!(codes(&broker, "dave", "dave pw").await, BAD_PASSWORD);
    assert_eq!(codes(&broker, "erin", "erin:pw").await, BAD_PASSWORD);
    std::fs::write(&file, "garbage without a colon\n").unwrap();
    let kept = r#"mqtt_im_reloads_total{file="password_file",result="kept"}"#;
    wait_for(|| metric(&broker, kept) == 1.0).await;
    assert_eq!(
        codes(&broker, "fay", "fay pw").await,
        ACCEPTED,
        "last good file kept"
    );
}

/// With change checks off, SIGHUP re-reads the file.
#[tokio::test]
async fn sighup_rereads_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    write_password_file(&file, &[("dave", "one")]);
    let path = file.clone();
    let broker = TestBroker::start_with(move |c| {
        c.auth.providers = vec![ProviderSettings::PasswordFile { path }];
        c.auth.reload_interval = mqtt_im::config::Period::millis(0);
    })
    .await;
    assert_eq!(codes(&broker, "dave", "one").await, ACCEPTED);
    write_password_file(&file, &[("dave", "two")]);
    // A window for nothing to happen: no change checks run, so nothing may re-read the file.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        codes(&broker, "dave", "two").await,
        BAD_PASSWORD,
        "not yet re-read"
    );
    let pid = std::process::id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    eventually(|| async { codes(&broker, "dave", "two").await == ACCEPTED }).await;
}

fn options(
    broker: &TestBroker,
    client_id: &str,
    user: &str,
    password: &str,
) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", broker.addr.port());
    options.set_credentials(user, password);
    options
}
