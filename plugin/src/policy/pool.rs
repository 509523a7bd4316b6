//! Several Lua states so policy calls run in parallel, the verdict chain, `on_error`, and
//! the counters an operator watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use mlua::{Function, Lua, MultiValue, Table, Value};
use tokio::sync::Semaphore;

use super::sandbox::{Hook, Sources, State};
use super::{ClientView, Decision, MessageView, Policy, PolicyError, SubscribeView};
use crate::config::{OnError, PolicySettings};

/// Verdict counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Calls that allowed.
    pub allowed: u64,
    /// Calls that denied (scripts' verdicts, not errors).
    pub denied: u64,
    /// Messages whose text a script rewrote.
    pub rewritten: u64,
    /// Script errors, limit hits and bad return values (each then followed `on_error`).
    pub errors: u64,
    /// Successful reloads.
    pub reloads: u64,
    /// Reloads refused because the new scripts did not load.
    pub failed_reloads: u64,
}

#[derive(Debug, Default)]
struct Counters {
    allowed: AtomicU64,
    denied: AtomicU64,
    rewritten: AtomicU64,
    errors: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

/// A set of loaded states; replaced whole on reload.
#[derive(Debug)]
struct Pool {
    idle: Mutex<Vec<State>>,
    permits: Semaphore,
}

/// The Lua policy: scripts from `policy.scripts`, run in a pool of sandboxed states.
#[derive(Debug)]
pub struct LuaPolicy {
    settings: PolicySettings,
    pool: RwLock<Arc<Pool>>,
    counters: Counters,
}

/// What a script's failure turns into.
struct ScriptFailure {
    script: String,
    error: String,
}

/// How the chain of scripts ended.
enum Chain {
    Allow { text: Option<String> },
    Deny(String),
}

impl LuaPolicy {
    /// Loads every script into `policy.states` states. A script that fails to load is kept
    /// as broken (its messages follow `on_error`); unreadable files are an error.
    ///
    /// # Errors
    /// A script or word list cannot be read, or a Lua state cannot be created.
    pub fn load(settings: PolicySettings) -> Result<Self, PolicyError> {
        let pool = build(&settings, false)?;
        Ok(Self {
            settings,
            pool: RwLock::new(Arc::new(pool)),
            counters: Counters::default(),
        })
    }

    /// Reads and loads the scripts again; new calls use them only if every script loaded.
    ///
    /// # Errors
    /// The new version failed to load; the old one stays in use.
    pub fn reload(&self) -> Result<(), PolicyError> {
        match build(&self.settings, true) {
            Ok(pool) => {
                if let Ok(mut current) = self.pool.write() {
                    *current = Arc::new(pool);
                }
                self.counters.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("policy scripts reloaded");
                Ok(())
            }
            Err(e) => {
                self.counters.failed_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "policy reload failed; keeping the previous scripts");
                Err(e)
            }
        }
    }

    /// The settings the policy was loaded with (files to watch for reload).
    pub(crate) fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Verdict counters since start.
    pub fn stats(&self) -> PolicyStats {
        let c = &self.counters;
        PolicyStats {
            allowed: c.allowed.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            rewritten: c.rewritten.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            reloads: c.reloads.load(Ordering::Relaxed),
            failed_reloads: c.failed_reloads.load(Ordering::Relaxed),
        }
    }

    /// Runs `hook` with an argument built by `argument` on an idle state.
    async fn run<F>(&self, hook: Hook, text: Option<String>, argument: F) -> Decision
    where
        F: Fn(&Lua, Option<&str>) -> mlua::Result<Table>,
    {
        let pool = match self.pool.read() {
            Ok(pool) => Arc::clone(&pool),
            Err(_) => return self.failed(hook, "policy pool lock poisoned".into(), "-".into()),
        };
        let Ok(_permit) = pool.permits.acquire().await else {
            return self.failed(hook, "policy pool closed".into(), "-".into());
        };
        let Some(state) = pool.idle.lock().ok().and_then(|mut idle| idle.pop()) else {
            return self.failed(hook, "no idle Lua state".into(), "-".into());
        };
        let outcome = chain(&state, hook, text, &argument);
        if let Ok(mut idle) = pool.idle.lock() {
            idle.push(state);
        }
        match outcome {
            Ok(Chain::Allow { text }) => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                if text.is_some() {
                    self.counters.rewritten.fetch_add(1, Ordering::Relaxed);
                }
                Decision::Allow(text)
            }
            Ok(Chain::Deny(reason)) => {
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
                Decision::Deny(reason)
            }
            Err(failure) => self.failed(hook, failure.error, failure.script),
        }
    }

    fn failed(&self, hook: Hook, error: String, script: String) -> Decision {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%script, ?hook, %error, on_error = ?self.settings.on_error, "policy script failed");
        match self.settings.on_error {
            OnError::Allow => Decision::Allow(None),
            // The client learns which script failed, not where the server keeps it.
            OnError::Deny => Decision::Deny(format!("policy error in {}", file_name(&script))),
        }
    }
}

fn file_name(path: &str) -> &str {
    std::path::Path::new(path)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or(path)
}

fn build(settings: &PolicySettings, strict: bool) -> Result<Pool, PolicyError> {
    let sources = Sources::read(settings)?;
    let mut idle = Vec::with_capacity(settings.states);
    for _ in 0..settings.states {
        idle.push(State::new(settings, &sources, strict)?);
    }
    Ok(Pool {
        idle: Mutex::new(idle),
        permits: Semaphore::new(settings.states),
    })
}

/// Runs the scripts in order until one allows or denies; rewrites carry on.
fn chain<F>(
    state: &State,
    hook: Hook,
    mut text: Option<String>,
    argument: &F,
) -> Result<Chain, ScriptFailure>
where
    F: Fn(&Lua, Option<&str>) -> mlua::Result<Table>,
{
    let mut rewritten = false;
    for implementation in state.implementations(hook) {
        let (script, function) = implementation.map_err(|(script, error)| ScriptFailure {
            script: script.to_owned(),
            error: format!("script did not load: {error}"),
        })?;
        let fail = |error: String| ScriptFailure {
            script: script.to_owned(),
            error,
        };
        state.start_call();
        let values = call(&state.lua, &function, text.as_deref(), argument)
            .map_err(|e| fail(e.to_string()))?;
        let mut values = values.into_iter();
        match values.next().unwrap_or(Value::Nil) {
            Value::Boolean(true) => {
                return Ok(Chain::Allow {
                    text: text.filter(|_| rewritten),
                })
            }
            Value::Boolean(false) => {
                let reason = match values.next() {
                    Some(Value::String(reason)) => reason.to_string_lossy(),
                    _ => format!("denied by {script}"),
                };
                return Ok(Chain::Deny(reason));
            }
            Value::Nil => {}
            Value::Table(fields) if hook == Hook::Message => {
                text = Some(rewrite(&fields).map_err(fail)?);
                rewritten = true;
            }
            other => {
                return Err(fail(format!(
                    "{} returned {}; expected true, false and a reason, nil{}",
                    hook.name(),
                    other.type_name(),
                    if hook == Hook::Message {
                        " or a table of fields"
                    } else {
                        ""
                    }
                )))
            }
        }
    }
    Ok(Chain::Allow {
        text: text.filter(|_| rewritten),
    })
}

fn call<F>(
    lua: &Lua,
    function: &Function,
    text: Option<&str>,
    argument: &F,
) -> mlua::Result<MultiValue>
where
    F: Fn(&Lua, Option<&str>) -> mlua::Result<Table>,
{
    function.call::<MultiValue>(argument(lua, text)?)
}

/// The text a rewrite table sets; only `text` may be rewritten.
fn rewrite(fields: &Table) -> Result<String, String> {
    let mut text = None;
    for pair in fields.pairs::<Value, Value>() {
        let (key, value) = pair.map_err(|e| e.to_string())?;
        match (key, value) {
            (Value::String(key), Value::String(value)) if key.to_string_lossy() == "text" => {
                text = Some(value.to_string_lossy());
            }
            (key, _) => {
                return Err(format!(
                    "a rewrite may only set `text` (a string), got {}",
                    key.to_string()
                        .unwrap_or_else(|_| key.type_name().to_owned())
                ))
            }
        }
    }
    text.ok_or_else(|| "a rewrite table must set `text`".to_owned())
}

#[async_trait]
impl Policy for LuaPolicy {
    async fn on_message(&self, message: &MessageView) -> Decision {
        self.run(Hook::Message, message.text.clone(), |lua, text| {
            let msg = lua.create_table()?;
            msg.set("from", message.from.as_str())?;
            msg.set("uid", message.from.as_str())?;
            msg.set("to", message.to.as_str())?;
            msg.set("chat_type", message.chat_type)?;
            msg.set("group", message.group.as_deref())?;
            msg.set("text", text)?;
            msg.set("media_url", message.media_url.as_deref())?;
            msg.set("msg_id", message.msg_id.as_str())?;
            msg.set("client_id", message.client_id.as_str())?;
            msg.set("conversation", message.conversation.as_str())?;
            Ok(msg)
        })
        .await
    }

    async fn on_connect(&self, client: &ClientView) -> Decision {
        self.run(Hook::Connect, None, |lua, _| {
            let table = lua.create_table()?;
            table.set("uid", client.uid.as_str())?;
            table.set("client_id", client.client_id.as_str())?;
            table.set("username", client.username.as_deref())?;
            table.set("protocol", client.protocol)?;
            table.set("clean_session", client.clean_session)?;
            table.set("keep_alive", client.keep_alive)?;
            Ok(table)
        })
        .await
    }

    async fn on_subscribe(&self, subscription: &SubscribeView) -> Decision {
        self.run(Hook::Subscribe, None, |lua, _| {
            let table = lua.create_table()?;
            table.set("uid", subscription.uid.as_str())?;
            table.set("client_id", subscription.client_id.as_str())?;
            table.set("filter", subscription.filter.as_str())?;
            table.set("qos", subscription.qos)?;
            Ok(table)
        })
        .await
    }
}
