//! An invalid configuration stops the binary with one line per problem naming the key.
use std::process::Command;

/// Two bad keys: two lines, each naming its key, and a non-zero exit.
#[test]
fn invalid_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["check-config"])
        .env("MQTT_IM__IM__PREFIX", "a/b")
        .env("MQTT_IM__IM__PAGE_SIZE_DEFAULT", "1000")
        .env("MQTT_IM__STORE__PATH", dir.path().join("x.db"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("config error"))
        .collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("im.prefix"), "{stderr}");
    assert!(lines[1].contains("im.page_size_default"), "{stderr}");
}

/// `check-config` accepts the shipped example configuration.
#[test]
fn example_config_is_valid() {
    let output = Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .args(["check-config", "--config", "examples/mqtt-im.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `mqtt-im migrate` applies the schema to the configured store and reports its version.
#[test]
fn migrate_command_applies_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .arg("migrate")
            .env("MQTT_IM__STORE__PATH", dir.path().join("im.db"))
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let output = run();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "schema at version 7"
        );
    }
    assert!(dir.path().join("im.db").exists());
}

/// A TLS listener needs a certificate and key: missing files are named by key, and files that
/// are not a usable certificate fail `check-config` as they would fail start-up.
#[test]
fn tls_listener_needs_usable_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let check = |cert: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
            .arg("check-config")
            .env("MQTT_IM__LISTENERS__TLS", "127.0.0.1:0")
            .env("MQTT_IM__TLS__CERT", cert)
            .env("MQTT_IM__TLS__KEY", cert)
            .output()
            .unwrap()
    };
    let missing = check(&dir.path().join("nope.pem"));
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("tls.cert") && stderr.contains("tls.key"),
        "{stderr}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let unusable = check(&garbage);
    assert!(!unusable.status.success());
    let stderr = String::from_utf8_lossy(&unusable.stderr);
    assert!(
        stderr.contains("tls.cert") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
}

/// `Config::default()` is the built-in defaults and reads nothing: a stray `MQTT_IM__*`
/// variable in an embedding process (here one that `load` refuses) changes nothing in it.
/// The test runs itself again in a child process with the variable set.
#[test]
fn default_reads_nothing_from_the_environment() {
    const STRAY: &str = "MQTT_IM__IM__PREFIX";
    if std::env::var_os(STRAY).is_some() {
        assert_eq!(mqtt_im::Config::default().im.prefix, "im");
        let refused = mqtt_im::Config::load(None).unwrap_err();
        assert!(refused.problems[0].starts_with("im.prefix"), "{refused}");
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "config::default_reads_nothing_from_the_environment",
        ])
        .env(STRAY, "a/b")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}
