//! The `[policy]` section: which scripts judge messages, and the limits they run under.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hook::OnError;
use crate::settings::{Period, Problems, DAY};

/// A value of the free-form `policy.config` table, handed read-only to scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    List(Vec<ConfigValue>),
    /// A table.
    Table(BTreeMap<String, ConfigValue>),
}

/// The Lua policy host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Scripts, run in this order; none means every message is allowed.
    pub scripts: Vec<PathBuf>,
    /// What a script error, a limit hit or a bad return value means.
    pub on_error: OnError,
    /// Lua states in the pool: how many policy calls may run at once.
    pub states: usize,
    /// Bytes of memory per Lua state.
    pub memory_limit: usize,
    /// Lua VM instructions per hook call (pattern-matching steps count too).
    pub instruction_limit: u64,
    /// CPU time one script call may take (time spent waiting for a core is not counted).
    pub call_timeout: Period,
    /// How long a call may wait for a free Lua state before it follows `on_error`.
    pub queue_timeout: Period,
    /// Word lists match whole words in alphabetic scripts (`heck` does not mask `heckler`);
    /// scripts without spaces between words (Chinese, Japanese) always match inside text.
    pub whole_words: bool,
    /// How often script and word-list files are checked for changes (0: only on SIGHUP).
    pub reload_interval: Period,
    /// Word lists for `words.find` / `words.mask`: name → file with one word per line.
    pub words: BTreeMap<String, PathBuf>,
    /// A read-only table scripts see as `config`.
    pub config: BTreeMap<String, ConfigValue>,
}

impl Settings {
    /// Values that parse but cannot work, and files that are not there.
    pub fn check(&self, problems: &mut Problems) {
        problems.check(
            (1..=64).contains(&self.states),
            "policy.states: between 1 and 64",
        );
        problems.check(
            self.memory_limit >= 1 << 20,
            "policy.memory_limit: at least 1048576 bytes",
        );
        problems.check(
            self.instruction_limit >= 1000,
            "policy.instruction_limit: at least 1000",
        );
        let (ms, ten_s) = (Duration::from_millis(1), Duration::from_secs(10));
        problems.within("policy.call_timeout", self.call_timeout, ms, ten_s);
        problems.within("policy.queue_timeout", self.queue_timeout, ms, ten_s);
        problems.within(
            "policy.reload_interval",
            self.reload_interval,
            Duration::ZERO,
            DAY,
        );
        for script in &self.scripts {
            problems.check(
                script.is_file(),
                &format!(
                    "policy.scripts: {} is not a readable file",
                    script.display()
                ),
            );
        }
        for (name, file) in &self.words {
            problems.check(
                file.is_file(),
                &format!(
                    "policy.words.{name}: {} is not a readable file",
                    file.display()
                ),
            );
        }
    }
}
