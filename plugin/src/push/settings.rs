//! The `[push]` section: which gateways pushers may name and what they may ask for.

use serde::{Deserialize, Serialize};

use std::time::Duration;

use crate::settings::{Period, Problems, DAY};

/// The path every Matrix push gateway serves notifications on.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// Offline push.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Notify URLs pushers may name, each compared whole
    /// (`http://sygnal:5000/_matrix/push/v1/notify`): a device cannot make the server call
    /// anything else. Empty: push is off and `PusherSet` is refused.
    pub allowed_urls: Vec<String>,
    /// Whether pushers may ask for `format = "full"` (sender and text in the notification,
    /// through the gateway and the platform's servers); off, nothing of a message leaves.
    pub allow_content: bool,
    /// Pushers one device may hold (one per app, usually).
    pub max_pushers_per_device: usize,
    /// How long after a message a notification waits: a read or a connect of any of the
    /// user's devices in between cancels it (the user is at a screen).
    pub delay: Period,
    /// At most one notification per user and conversation this often; messages in between
    /// are covered by the next one.
    pub coalesce: Period,
    /// Deadline of one call to a gateway.
    pub timeout: Period,
    /// Owed notifications kept while gateways cannot take them; beyond, the oldest are
    /// dropped (and counted).
    pub max_pending: usize,
}

impl Settings {
    /// Whether pushers are taken and notifications sent at all.
    pub fn enabled(&self) -> bool {
        !self.allowed_urls.is_empty()
    }

    /// Every URL an allowed gateway notify URL, the limits and times sane.
    pub fn check(&self, problems: &mut Problems) {
        let (ms, second) = (Duration::from_millis(1), Duration::from_secs(1));
        problems.within("push.delay", self.delay, Duration::ZERO, DAY);
        problems.within("push.coalesce", self.coalesce, Duration::ZERO, DAY);
        problems.within("push.timeout", self.timeout, ms, 60 * second);
        for url in &self.allowed_urls {
            if let Err(why) = check_url(url) {
                problems.push(format!("push.allowed_urls: {url:?} {why}"));
            }
        }
        problems.check(self.max_pending >= 1, "push.max_pending: at least 1");
        problems.check(
            (1..=100).contains(&self.max_pushers_per_device),
            "push.max_pushers_per_device: between 1 and 100",
        );
    }
}

/// Why `url` cannot be a gateway's notify URL.
fn check_url(url: &str) -> Result<(), &'static str> {
    let uri: hyper::Uri = url.parse().map_err(|_| "does not parse as a URL")?;
    if uri.scheme_str() != Some("http") {
        return Err("must be http:// (put TLS in a local proxy)");
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if uri.path() != NOTIFY_PATH || uri.query().is_some() {
        return Err("must end in /_matrix/push/v1/notify, without a query");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_notify_urls_are_gateways() {
        assert!(check_url("http://sygnal:5000/_matrix/push/v1/notify").is_ok());
        assert!(check_url("http://127.0.0.1/_matrix/push/v1/notify").is_ok());
        for bad in [
            "https://sygnal/_matrix/push/v1/notify",
            "http://sygnal/_matrix/push/v1/notify?x=1",
            "http://sygnal/elsewhere",
            "sygnal:5000",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad:?}");
        }
    }
}
