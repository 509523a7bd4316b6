//! Hot reload: when a script or word list changes on disk (checked every
//! `policy.reload_interval_ms`) or on SIGHUP, the policy loads the new version; if it fails
//! to load, the old one stays.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::LuaPolicy;

/// Watches the policy's files until `shutdown`.
pub(crate) async fn watch(policy: Arc<LuaPolicy>, shutdown: CancellationToken) {
    let settings = policy.settings();
    let paths = settings
        .scripts
        .iter()
        .chain(settings.words.values())
        .cloned()
        .collect();
    let interval = settings.reload_interval_ms;
    // A failed reload is logged by `reload` and keeps the old scripts.
    let reload = Arc::new(move || drop(policy.reload()));
    crate::watch::on_change(paths, interval, reload, shutdown).await;
}
