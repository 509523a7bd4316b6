//! Hot reload: when a script or word list changes on disk (checked every
//! `policy.reload_interval`) or on SIGHUP, the policy loads the new version; if it fails
//! to load, the old one stays.

use std::sync::Arc;
use std::time::Duration;

use super::LuaPolicy;
use crate::watch::Watched;

/// The policy's scripts and word lists, reloaded together, and how often to look at them.
pub(crate) fn watched(policy: Arc<LuaPolicy>) -> (Arc<Watched>, Duration) {
    let settings = policy.settings();
    let files = settings
        .scripts
        .iter()
        .chain(settings.words.values())
        .cloned()
        .collect();
    let interval = settings.reload_interval.0;
    // A failed reload is logged by `reload` and keeps the old scripts.
    let reload = Arc::new(move || policy.reload().is_ok());
    let watched = Arc::new(Watched {
        files,
        what: "policy",
        reload,
    });
    (watched, interval)
}
