use std::io::Write;
use std::time::Duration;

use super::*;

fn load(toml: &str) -> Result<Config, ConfigError> {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    writeln!(file, "{toml}").unwrap();
    Config::load(Some(file.path()))
}

#[test]
fn defaults_are_valid() {
    let config = Config::default();
    assert_eq!(config.im.prefix, "im");
    assert_eq!(config.store.backend, Backend::Embedded);
    config.validate().unwrap();
    assert_eq!(
        config.im.retention.direct.get(),
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(config.cluster.heartbeat, Period::millis(1000));
}

#[test]
fn retention_is_one_period_or_one_per_kind() {
    let load = |toml: &str| load(toml).map(|c| c.im.retention);
    let day = Some(Duration::from_secs(86_400));
    let both = load("[im]\nretention = \"1d\"").unwrap();
    assert_eq!((both.direct.get(), both.group.get()), (day, day));
    let split = load("[im.retention]\ngroup = \"1d\"").unwrap();
    assert_eq!(split.group.get(), day);
    assert_eq!(split.direct.get(), Some(Duration::from_secs(30 * 86_400)));
    let err = load("[im]\nretention = \"1w\"").unwrap_err();
    assert!(err.problems[0].contains("the unit must be"), "{err}");
    let err = load("[im.retention]\ngroup = \"x\"").unwrap_err();
    assert!(err.problems[0].contains("group: \"x\""), "{err}");
    // Huge periods are refused, never overflow.
    let mut config = Config::default();
    config.im.gc_interval = "106751991167d".parse().unwrap();
    config.im.device_ttl = "106751991167d".parse().unwrap();
    let err = config.validate().unwrap_err();
    assert!(err.problems[0].starts_with("im.gc_interval:"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let err =
        load("[im]\nprefix = \"a/b\"\npage_size_default = 500\n[store]\nbogus = 1\n[nope]\nx = 1")
            .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("store:"), "{text}");
    assert!(text.contains("nope: unknown section"), "{text}");
    let err = load("[im]\nprefix = \"a/b\"\npage_size_default = 500").unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(err.problems[0].starts_with("im.prefix:"));
    assert!(err.problems[1].starts_with("im.page_size_default:"));
}

#[test]
fn every_time_is_a_period_and_the_old_millisecond_keys_still_read() {
    let config = load("[im]\nremoval_poll = \"2s\"\n[cluster]\nheartbeat_ms = 250").unwrap();
    assert_eq!(config.im.removal_poll, Period::millis(2000));
    assert_eq!(config.cluster.heartbeat, Period::millis(250));
    let err = load("[policy]\ncall_timeout = 20").unwrap_err();
    assert!(err.problems[0].contains("no unit"), "{err}");
    let err = load("[policy]\ncall_timeout = \"1m\"").unwrap_err();
    assert_eq!(
        err.problems,
        vec!["policy.call_timeout: between 1ms and 10s"],
        "{err}"
    );
}
