//! Files an operator edits while the broker runs (policy scripts, word lists, password
//! files): re-read when their content changes (checked every `interval_ms`) or on SIGHUP.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A fingerprint of the files' contents (unreadable files count as changed).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// Calls `reload` (on a blocking thread: it reads files and may run scripts) whenever one of
/// `paths` changes, or on SIGHUP, until `shutdown`. `interval_ms` 0: SIGHUP only.
pub(crate) async fn on_change(
    paths: Vec<PathBuf>,
    interval_ms: u64,
    reload: Arc<dyn Fn() + Send + Sync>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    let mut hangup = hangups();
    let mut seen = fingerprint(&paths);
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick(), if interval_ms > 0 => false,
            Some(()) = next_hangup(&mut hangup) => true,
        };
        let current = fingerprint(&paths);
        if forced || current != seen {
            seen = current;
            let reload = Arc::clone(&reload);
            let _ = tokio::task::spawn_blocking(move || reload()).await;
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
