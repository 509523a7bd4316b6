//! Hot reload: when a script or word list changes on disk (checked every
//! `policy.reload_interval_ms`) or on SIGHUP, the policy loads the new version; if it fails
//! to load, the old one stays.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::LuaPolicy;

/// A fingerprint of every file the policy reads (unreadable files count as changed).
fn fingerprint(policy: &LuaPolicy) -> u64 {
    let settings = policy.settings();
    let mut hasher = DefaultHasher::new();
    for path in settings.scripts.iter().chain(settings.words.values()) {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// Watches the policy's files until `shutdown`.
pub(crate) async fn watch(policy: Arc<LuaPolicy>, shutdown: CancellationToken) {
    let interval = policy.settings().reload_interval_ms;
    let mut ticker = tokio::time::interval(Duration::from_millis(interval.max(1)));
    let mut hangup = hangups();
    let mut seen = fingerprint(&policy);
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick(), if interval > 0 => false,
            Some(()) = next_hangup(&mut hangup) => true,
        };
        let current = fingerprint(&policy);
        if forced || current != seen {
            seen = current;
            let policy = Arc::clone(&policy);
            // Loading runs top-level Lua code: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || policy.reload()).await;
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangups() -> Hangups {
    None
}

#[cfg(unix)]
async fn next_hangup(signal: &mut Hangups) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}
