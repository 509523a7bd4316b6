//! One Lua state with every script loaded: safe standard library subset, a memory limit,
//! an instruction budget per call, and one environment per script.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, VmState};

use super::{api, words::WordList, PolicyError};
use crate::config::PolicySettings;

/// Instructions between two budget checks.
const BUDGET_STEP: u32 = 1000;

/// The hooks a script may implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Message,
    Connect,
    Subscribe,
}

impl Hook {
    /// The field of `hooks` a script sets.
    pub(super) fn name(self) -> &'static str {
        match self {
            Hook::Message => "on_message",
            Hook::Connect => "on_connect",
            Hook::Subscribe => "on_subscribe",
        }
    }
}

/// A loaded script: its hooks, or why it could not be loaded.
#[derive(Debug)]
pub(super) enum Script {
    Loaded {
        name: String,
        hooks: Table,
    },
    /// Kept from a first load that failed: every message it should judge is an error.
    Broken {
        name: String,
        error: String,
    },
}

/// A script's function for a hook, or (script, load error) for a broken script.
pub(super) type Implementation<'a> = Result<(&'a str, Function), (&'a str, &'a str)>;

/// A Lua state ready to run hooks.
#[derive(Debug)]
pub(super) struct State {
    pub(super) lua: Lua,
    pub(super) scripts: Vec<Script>,
    spent: Arc<AtomicU64>,
}

/// The script sources, read once per (re)load and shared by every state.
#[derive(Debug, Clone)]
pub(super) struct Sources {
    pub(super) scripts: Vec<(String, String)>,
    pub(super) words: Arc<BTreeMap<String, WordList>>,
}

impl Sources {
    /// Reads every script and word list named in `settings`.
    pub(super) fn read(settings: &PolicySettings) -> Result<Self, PolicyError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let mut scripts = Vec::with_capacity(settings.scripts.len());
        for path in &settings.scripts {
            scripts.push((path.display().to_string(), read(path)?));
        }
        let mut words = BTreeMap::new();
        for (name, path) in &settings.words {
            let list = WordList::new(read(path)?.lines()).map_err(|e| PolicyError::Words {
                name: name.clone(),
                message: e.to_string(),
            })?;
            words.insert(name.clone(), list);
        }
        Ok(Self {
            scripts,
            words: Arc::new(words),
        })
    }
}

impl State {
    /// A state with every script loaded. With `strict`, a script that fails to load fails
    /// the whole state (reload keeps the old one); otherwise it is kept as broken.
    pub(super) fn new(
        settings: &PolicySettings,
        sources: &Sources,
        strict: bool,
    ) -> Result<Self, PolicyError> {
        let lua_error = |e: mlua::Error| PolicyError::Lua(e.to_string());
        let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(lua_error)?;
        let spent = Arc::new(AtomicU64::new(0));
        let limit = settings.instruction_limit;
        let counter = Arc::clone(&spent);
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(BUDGET_STEP),
            move |_, debug| {
                let used = counter.fetch_add(u64::from(BUDGET_STEP), Ordering::Relaxed);
                if used + u64::from(BUDGET_STEP) > limit {
                    let line = debug.current_line().unwrap_or(0);
                    let source = debug.source().short_src.map(|s| s.into_owned());
                    Err(mlua::Error::RuntimeError(format!(
                        "{}:{line}: instruction budget of {limit} exceeded",
                        source.unwrap_or_default()
                    )))
                } else {
                    Ok(VmState::Continue)
                }
            },
        )
        .map_err(lua_error)?;
        let globals = lua.globals();
        restrict(&globals).map_err(lua_error)?;
        api::install(&lua, &globals, Arc::clone(&sources.words), &settings.config)
            .map_err(lua_error)?;
        lua.set_memory_limit(settings.memory_limit)
            .map_err(lua_error)?;
        let mut state = Self {
            lua,
            scripts: Vec::new(),
            spent,
        };
        for (name, source) in &sources.scripts {
            let script = match state.load(name, source) {
                Ok(hooks) => Script::Loaded {
                    name: name.clone(),
                    hooks,
                },
                Err(message) if strict => {
                    return Err(PolicyError::Script {
                        script: name.clone(),
                        message,
                    })
                }
                Err(error) => {
                    tracing::error!(script = %name, %error, "policy script failed to load");
                    Script::Broken {
                        name: name.clone(),
                        error,
                    }
                }
            };
            state.scripts.push(script);
        }
        Ok(state)
    }

    /// Runs a script's top-level code in its own environment and returns its `hooks`.
    fn load(&self, name: &str, source: &str) -> Result<Table, String> {
        let build = || -> mlua::Result<Table> {
            let env = self.lua.create_table()?;
            let meta = self.lua.create_table()?;
            meta.set("__index", self.lua.globals())?;
            env.set_metatable(Some(meta))?;
            env.set("log", api::log_table(&self.lua, name)?)?;
            self.start_call();
            self.lua
                .load(source)
                .set_name(format!("@{name}"))
                .set_mode(ChunkMode::Text)
                .set_environment(env.clone())
                .exec()?;
            match env.raw_get::<mlua::Value>("hooks")? {
                mlua::Value::Table(hooks) => Ok(hooks),
                mlua::Value::Nil => self.lua.create_table(),
                _ => Err(mlua::Error::RuntimeError("`hooks` must be a table".into())),
            }
        };
        build().map_err(|e| e.to_string())
    }

    /// Resets the instruction budget for one call.
    pub(super) fn start_call(&self) {
        self.spent.store(0, Ordering::Relaxed);
    }

    /// The scripts' implementations of `hook`, in order; broken scripts count for messages.
    pub(super) fn implementations(&self, hook: Hook) -> Vec<Implementation<'_>> {
        self.scripts
            .iter()
            .filter_map(|script| match script {
                Script::Loaded { name, hooks } => hooks
                    .get::<Option<Function>>(hook.name())
                    .ok()
                    .flatten()
                    .map(|f| Ok((name.as_str(), f))),
                Script::Broken { name, error } => {
                    (hook == Hook::Message).then_some(Err((name.as_str(), error.as_str())))
                }
            })
            .collect()
    }
}

/// Removes everything that reaches outside the sandbox or around its limits.
fn restrict(globals: &Table) -> mlua::Result<()> {
    for name in [
        "dofile",
        "loadfile",
        "load",
        "require",
        "collectgarbage",
        "rawset",
        "print",
        "module",
        "package",
        "debug",
        "io",
        "os",
        "coroutine",
    ] {
        globals.set(name, mlua::Value::Nil)?;
    }
    if let Ok(string) = globals.get::<Table>("string") {
        string.set("dump", mlua::Value::Nil)?;
    }
    Ok(())
}
