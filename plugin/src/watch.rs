//! Files an operator edits while the broker runs (policy scripts, word lists, password, ACL
//! and JWKS files): re-read when their content changes (checked every `interval`) or on
//! SIGHUP. Reading the files, to see whether they changed and to load them, happens on the
//! blocking pool, never on a runtime worker.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// Files watched together, and what re-reads them.
pub(crate) struct Watched {
    /// The files; a change to any of them reloads all.
    pub(crate) files: Vec<PathBuf>,
    /// What they are, as `mqtt_im_reloads_total` names it (`policy`, `password_file`, ...).
    pub(crate) what: &'static str,
    /// Re-reads the files: `true` when the new version is in use, `false` when it failed to
    /// load and the last good one stays.
    pub(crate) reload: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("files", &self.files)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

/// How reloads went: counted as loaded, or as kept (the new version failed to load).
pub(crate) struct Outcomes {
    pub(crate) loaded: Counter,
    pub(crate) kept: Counter,
}

/// A fingerprint of the files' contents (unreadable files count as changed).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// The fingerprint, taken on the blocking pool; `None` if that pool is gone (shutdown).
async fn fingerprint_off_runtime(paths: &Arc<[PathBuf]>) -> Option<u64> {
    let paths = Arc::clone(paths);
    tokio::task::spawn_blocking(move || fingerprint(&paths))
        .await
        .ok()
}

/// Calls `watched.reload` (on the blocking pool: it reads files and may run scripts)
/// whenever one of its files changes, or on SIGHUP, until `shutdown`, counting each outcome.
/// `interval` zero: SIGHUP only.
pub(crate) async fn on_change(
    watched: Arc<Watched>,
    interval: Duration,
    outcomes: Outcomes,
    shutdown: CancellationToken,
) {
    let files: Arc<[PathBuf]> = watched.files.clone().into();
    let reload = Arc::clone(&watched.reload);
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    let mut hangup = hangups();
    let mut seen = fingerprint_off_runtime(&files).await;
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick(), if !interval.is_zero() => false,
            Some(()) = next_hangup(&mut hangup) => true,
        };
        let current = fingerprint_off_runtime(&files).await;
        if forced || current != seen {
            seen = current;
            let reload = Arc::clone(&reload);
            match tokio::task::spawn_blocking(move || reload()).await {
                Ok(true) => outcomes.loaded.inc(),
                Ok(false) | Err(_) => outcomes.kept.inc(),
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A file that changes is reloaded and counted; one that then fails to load is counted
    /// as kept.
    #[tokio::test]
    async fn changes_reload_and_each_outcome_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("watched.txt");
        std::fs::write(&file, "one").unwrap();
        let loads = Arc::new(AtomicBool::new(true));
        let answer = Arc::clone(&loads);
        let watched = Arc::new(Watched {
            files: vec![file.clone()],
            what: "test",
            reload: Arc::new(move || answer.load(Ordering::SeqCst)),
        });
        let outcomes = Outcomes {
            loaded: Counter::default(),
            kept: Counter::default(),
        };
        let (loaded, kept) = (outcomes.loaded.clone(), outcomes.kept.clone());
        let shutdown = CancellationToken::new();
        let watching = tokio::spawn(on_change(
            watched,
            Duration::from_millis(10),
            outcomes,
            shutdown.clone(),
        ));
        // Edits until the watcher has seen one (its first look may come after an edit).
        let edit_until = move |done: Counter| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut edits = 0u32;
            while done.get() == 0 {
                assert!(std::time::Instant::now() < deadline, "no reload");
                edits += 1;
                std::fs::write(&file, edits.to_string()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let editing = edit_until.clone();
        tokio::task::spawn_blocking(move || editing(loaded))
            .await
            .unwrap();
        assert_eq!(kept.get(), 0);
        loads.store(false, Ordering::SeqCst);
        let kept_now = kept.clone();
        tokio::task::spawn_blocking(move || edit_until(kept_now))
            .await
            .unwrap();
        assert!(kept.get() >= 1);
        shutdown.cancel();
        watching.await.unwrap();
    }
}
