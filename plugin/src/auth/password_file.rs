//! The `password_file` provider: a Mosquitto password file as `mosquitto_passwd` writes it
//! (`user:$7$…` or `user:$6$…`, one per line, `#` comments), re-read when it changes or on
//! SIGHUP. A file that stops parsing keeps the last good version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use super::hash::StoredHash;
use super::{judge, AuthError, Credentials, Hashing, Provider, Verdict};

/// A password file and the users last read from it.
#[derive(Debug)]
pub struct PasswordFile {
    path: PathBuf,
    users: RwLock<HashMap<String, Arc<StoredHash>>>,
    hashing: Arc<Hashing>,
}

impl PasswordFile {
    /// Reads the file; an unreadable or malformed file is a start-up error.
    pub(super) fn open(path: &Path, hashing: Arc<Hashing>) -> Result<Self, AuthError> {
        Ok(Self {
            users: RwLock::new(read(path)?),
            path: path.to_owned(),
            hashing,
        })
    }

    /// The file this provider reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file; on a problem the old users stay and the problem is logged. `true`
    /// when the new users are in use.
    pub fn reload(&self) -> bool {
        match read(&self.path) {
            Ok(users) => {
                let count = users.len();
                *self.users.write().unwrap_or_else(PoisonError::into_inner) = users;
                tracing::info!(file = %self.path.display(), users = count, "password file loaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "password file not reloaded; keeping the last good one");
                false
            }
        }
    }
}

/// Parses a whole file: `user:hash` lines; blank lines and `#` comments are skipped.
fn read(path: &Path) -> Result<HashMap<String, Arc<StoredHash>>, AuthError> {
    let problem = |problem: String| AuthError::File {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, stored)) = line.split_once(':') else {
            return Err(problem(format!("line {}: expected user:hash", number + 1)));
        };
        let hash = StoredHash::parse(stored, false)
            .map_err(|e| problem(format!("line {} ({user}): {e}", number + 1)))?;
        users.insert(user.to_owned(), Arc::new(hash));
    }
    Ok(users)
}

#[async_trait::async_trait]
impl Provider for PasswordFile {
    fn name(&self) -> &'static str {
        "password_file"
    }

    async fn check(&self, credentials: &Credentials) -> Result<Verdict, AuthError> {
        let stored = credentials.username.as_deref().and_then(|user| {
            self.users
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(user)
                .cloned()
        });
        judge(&self.hashing, stored, credentials.password.as_deref()).await
    }
}
