//! One Lua state with every script loaded. The sandbox: a safe subset of the standard
//! library, a memory limit, and a meter per call (instructions, pattern-matching steps and a
//! CPU-time deadline) that `pcall` cannot outlast; every script gets its own environment
//! with read-only views of the libraries and helpers, so no script can change what another
//! sees; no finalizers (`__gc`) and a protected string metatable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use super::settings::Settings as PolicySettings;
use super::{api, patterns, words::WordList, PolicyError};

/// Instructions between two checks of the meter.
const METER_STEP: u32 = 1000;

/// The hooks a script may implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Message,
    Connect,
    Subscribe,
    /// A publish to a non-IM topic.
    Publish,
    /// Credentials, as an authentication provider.
    Auth,
    /// A notification about to go to a device's push gateway.
    Push,
}

/// How many hooks there are.
pub(super) const HOOKS: usize = 6;

impl Hook {
    pub(super) const ALL: [Hook; HOOKS] = [
        Hook::Message,
        Hook::Connect,
        Hook::Subscribe,
        Hook::Publish,
        Hook::Auth,
        Hook::Push,
    ];

    /// The field of `hooks` a script sets.
    pub(super) fn name(self) -> &'static str {
        match self {
            Hook::Message => "on_message",
            Hook::Connect => "on_connect",
            Hook::Subscribe => "on_subscribe",
            Hook::Publish => "on_publish",
            Hook::Auth => "on_auth",
            Hook::Push => "on_push",
        }
    }

    /// Its place in per-hook arrays.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Why a call ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exhausted {
    /// The instruction budget (pattern-matching steps count as instructions).
    Budget,
    /// The CPU-time deadline.
    Deadline,
}

/// The meter of the call running on a state. Once it has run out it stays out until the
/// next call starts: every later check fails again, and `pcall` re-raises.
#[derive(Debug, Clone)]
pub(super) struct Meter(Arc<MeterState>);

#[derive(Debug)]
struct MeterState {
    limit: u64,
    spent: AtomicU64,
    base: Instant,
    /// Nanoseconds after `base`: when the call's CPU time is next checked.
    deadline: AtomicU64,
    /// The running thread's CPU time when the call started, in nanoseconds.
    cpu_start: AtomicU64,
    /// 0: running, 1: budget, 2: deadline.
    out: AtomicU64,
    timeout: Duration,
}

impl Meter {
    fn new(limit: u64, timeout: Duration) -> Self {
        Self(Arc::new(MeterState {
            limit,
            spent: AtomicU64::new(0),
            base: Instant::now(),
            deadline: AtomicU64::new(u64::MAX),
            cpu_start: AtomicU64::new(0),
            out: AtomicU64::new(0),
            timeout,
        }))
    }

    /// Starts a call on this thread: a full budget and `timeout` of CPU time.
    pub(super) fn start(&self) {
        self.0
            .cpu_start
            .store(thread_cpu_nanos(), Ordering::Relaxed);
        self.check_again_in(self.0.timeout);
        self.0.spent.store(0, Ordering::Relaxed);
        self.0.out.store(0, Ordering::Relaxed);
    }

    /// The wall clock is cheap to read: the thread's CPU time is read only once `wait` has
    /// passed, as the call cannot have used more CPU than that.
    fn check_again_in(&self, wait: Duration) {
        let at = self.0.base.elapsed() + wait;
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.0.deadline.store(nanos, Ordering::Relaxed);
    }

    /// Whether the call has used up its CPU time. A thread that waited for a core (a loaded
    /// machine) is not charged for the wait: the check is put off by what is left.
    fn out_of_time(&self) -> bool {
        if self.0.base.elapsed().as_nanos() <= u128::from(self.0.deadline.load(Ordering::Relaxed)) {
            return false;
        }
        let used = thread_cpu_nanos().saturating_sub(self.0.cpu_start.load(Ordering::Relaxed));
        match self.0.timeout.checked_sub(Duration::from_nanos(used)) {
            Some(left) if !left.is_zero() => {
                self.check_again_in(left);
                false
            }
            _ => true,
        }
    }

    /// Charges `steps`; fails once the budget or the deadline is passed, and from then on.
    pub(super) fn charge(&self, steps: u64) -> mlua::Result<()> {
        if let Some(why) = self.exhausted() {
            return Err(self.error(why));
        }
        let spent = self.0.spent.fetch_add(steps, Ordering::Relaxed) + steps;
        let why = if spent > self.0.limit {
            Exhausted::Budget
        } else if self.out_of_time() {
            Exhausted::Deadline
        } else {
            return Ok(());
        };
        let code = match why {
            Exhausted::Budget => 1,
            Exhausted::Deadline => 2,
        };
        self.0.out.store(code, Ordering::Relaxed);
        Err(self.error(why))
    }

    /// Whether (and why) the call ran out.
    pub(super) fn exhausted(&self) -> Option<Exhausted> {
        match self.0.out.load(Ordering::Relaxed) {
            1 => Some(Exhausted::Budget),
            2 => Some(Exhausted::Deadline),
            _ => None,
        }
    }

    fn error(&self, why: Exhausted) -> mlua::Error {
        mlua::Error::RuntimeError(match why {
            Exhausted::Budget => format!("instruction budget of {} exceeded", self.0.limit),
            Exhausted::Deadline => {
                format!(
                    "deadline of {} ms (CPU time) exceeded",
                    self.0.timeout.as_millis()
                )
            }
        })
    }
}

/// CPU time used by the calling thread so far.
fn thread_cpu_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// A loaded script: its hooks, or why it could not be loaded.
#[derive(Debug)]
pub(super) enum Script {
    Loaded {
        /// The file name (never the server's path).
        name: String,
        hooks: [Option<Function>; HOOKS],
    },
    /// Kept from a first load that failed: under `on_error = "deny"` it denies every hook.
    Broken { name: String, error: String },
}

impl Script {
    pub(super) fn name(&self) -> &str {
        match self {
            Script::Loaded { name, .. } | Script::Broken { name, .. } => name,
        }
    }

    /// The script's function for `hook`, if it has one.
    pub(super) fn hook(&self, hook: Hook) -> Option<&Function> {
        match self {
            Script::Loaded { hooks, .. } => hooks[hook.index()].as_ref(),
            Script::Broken { .. } => None,
        }
    }
}

/// A Lua state ready to run hooks.
#[derive(Debug)]
pub(super) struct State {
    pub(super) lua: Lua,
    pub(super) scripts: Vec<Script>,
    pub(super) meter: Meter,
    /// Builds a message's fields table inside Lua ([`MESSAGE_FIELDS`]).
    pub(super) message_fields: Function,
    /// Calls a hook with its own copy of a fields table ([`CALL_WITH_COPY`]).
    pub(super) call_with_copy: Function,
}

/// The script sources, read once per (re)load and shared by every state.
#[derive(Debug, Clone)]
pub(super) struct Sources {
    /// (file name, source), in chain order.
    pub(super) scripts: Vec<(String, String)>,
    pub(super) words: Arc<BTreeMap<String, WordList>>,
}

/// The file name of a script path: what clients and logs see of it.
pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("script")
        .to_owned()
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
            scripts.push((file_name(path), read(path)?));
        }
        let mut words = BTreeMap::new();
        for (name, path) in &settings.words {
            let list = WordList::new(read(path)?.lines(), settings.whole_words).map_err(|e| {
                PolicyError::Words {
                    name: name.clone(),
                    message: e.to_string(),
                }
            })?;
            words.insert(name.clone(), list);
        }
        Ok(Self {
            scripts,
            words: Arc::new(words),
        })
    }
}

/// The base functions every script gets (C functions: values no script can change).
const BASE: [&str; 15] = [
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "rawequal",
    "rawget",
    "rawlen",
    "select",
    "tonumber",
    "tostring",
    "type",
    "_VERSION",
    "unpack",
];

/// `pcall` and `xpcall` that re-raise once the call's meter has run out, so a script cannot
/// catch its way past its limits; `setmetatable` without finalizers.
const GUARDS: &str = r#"
local raw_pcall, raw_xpcall, raw_setmetatable, rawget, error, select = ...
local exhausted = select(7, ...)
local function pass(ok, ...)
  if not ok and exhausted() then error((...), 0) end
  return ok, ...
end
local guards = {}
function guards.pcall(f, ...)
  return pass(raw_pcall(f, ...))
end
function guards.xpcall(f, handler, ...)
  return pass(raw_xpcall(f, function(e)
    if exhausted() then return e end
    return handler(e)
  end, ...))
end
function guards.setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc is not allowed in policy scripts", 2)
  end
  return raw_setmetatable(t, mt)
end
return guards
"#;

/// `message_fields(from, to, chat_type, group, text, media_url, msg_id, client_id,
/// conversation)`: a message's table built by the VM in one call from Rust, instead of one
/// locked API call per field (the hot path of every chat message).
const MESSAGE_FIELDS: &str = r#"
return function(from, to, chat_type, group, text, media_url, msg_id, client_id, conversation)
  return {
    from = from, uid = from, to = to, chat_type = chat_type, group = group, text = text,
    media_url = media_url, msg_id = msg_id, client_id = client_id, conversation = conversation,
  }
end
"#;

/// `call_with_copy(hook, fields)`: every script gets its own copy of the fields, so nothing
/// one script writes into its argument reaches the next; the values (strings) are shared.
const CALL_WITH_COPY: &str = r#"
local next = next
return function(hook, fields)
  local copy = {}
  for key, value in next, fields do copy[key] = value end
  return hook(copy)
end
"#;

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
        let meter = Meter::new(settings.instruction_limit, settings.call_timeout.0);
        let hook_meter = meter.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(METER_STEP),
            move |_, debug| {
                hook_meter.charge(u64::from(METER_STEP)).map_err(|e| {
                    let line = debug.current_line().unwrap_or(0);
                    let source = debug.source().short_src.map(|s| s.into_owned());
                    mlua::Error::RuntimeError(format!("{}:{line}: {e}", source.unwrap_or_default()))
                })?;
                Ok(VmState::Continue)
            },
        )
        .map_err(lua_error)?;
        let shared = Shared::new(&lua, &meter, sources, settings).map_err(lua_error)?;
        let trusted = |name: &str, source: &str| {
            lua.load(source)
                .set_name(format!("={name}"))
                .eval::<Function>()
                .map_err(lua_error)
        };
        let message_fields = trusted("message", MESSAGE_FIELDS)?;
        let call_with_copy = trusted("call", CALL_WITH_COPY)?;
        lua.set_memory_limit(settings.memory_limit)
            .map_err(lua_error)?;
        let mut state = Self {
            lua,
            scripts: Vec::new(),
            meter,
            message_fields,
            call_with_copy,
        };
        for (name, source) in &sources.scripts {
            let script = match state.load(&shared, name, source, settings) {
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
                Err(error) => Script::Broken {
                    name: name.clone(),
                    error,
                },
            };
            state.scripts.push(script);
        }
        Ok(state)
    }

    /// Runs a script's top-level code (metered) in its own environment and returns its hooks.
    fn load(
        &self,
        shared: &Shared,
        name: &str,
        source: &str,
        settings: &PolicySettings,
    ) -> Result<[Option<Function>; HOOKS], String> {
        let env = shared
            .environment(&self.lua, name, settings)
            .map_err(|e| e.to_string())?;
        self.meter.start();
        self.lua
            .load(source)
            .set_name(format!("@{name}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env.clone())
            .exec()
            .map_err(|e| first_line(&e.to_string()))?;
        let hooks = match env.raw_get::<Value>("hooks").map_err(|e| e.to_string())? {
            Value::Table(hooks) => hooks,
            Value::Nil => return Ok(Default::default()),
            other => {
                return Err(format!(
                    "`hooks` must be a table, not a {}",
                    other.type_name()
                ))
            }
        };
        let mut found: [Option<Function>; HOOKS] = Default::default();
        for pair in hooks.pairs::<Value, Value>() {
            let (key, value) = pair.map_err(|e| e.to_string())?;
            let key = key
                .to_string()
                .unwrap_or_else(|_| key.type_name().to_owned());
            let hook = Hook::ALL.into_iter().find(|h| h.name() == key);
            let line = match &value {
                Value::Function(f) => f.info().line_defined,
                _ => line_of(source, &key),
            };
            let at = line
                .map(|l| format!("{name}:{l}: "))
                .unwrap_or_else(|| format!("{name}: "));
            match (hook, value) {
                (Some(hook), Value::Function(function)) => found[hook.index()] = Some(function),
                (Some(_), other) => {
                    return Err(format!(
                        "{at}hooks.{key} must be a function, not a {}",
                        other.type_name()
                    ))
                }
                (None, _) => {
                    return Err(format!(
                        "{at}hooks.{key} is not a hook (on_message, on_connect, on_subscribe, on_publish, on_auth)"
                    ))
                }
            }
        }
        Ok(found)
    }
}

/// Lua's message, first line only (no traceback), without control characters.
fn first_line(message: &str) -> String {
    crate::text::clean(message.lines().next().unwrap_or(message), 512)
}

/// The first line of `source` that mentions `key`.
fn line_of(source: &str, key: &str) -> Option<usize> {
    source
        .lines()
        .position(|line| line.contains(key))
        .map(|i| i + 1)
}

/// What every script's environment is built from.
struct Shared {
    base: Vec<(&'static str, Value)>,
    guards: Table,
    libraries: Vec<(&'static str, Table)>,
    words: Table,
    os: Table,
    config: Table,
}

impl Shared {
    fn new(
        lua: &Lua,
        meter: &Meter,
        sources: &Sources,
        settings: &PolicySettings,
    ) -> mlua::Result<Self> {
        let globals = lua.globals();
        let string: Table = globals.get("string")?;
        patterns::install(lua, &string, meter)?;
        string.set("dump", Value::Nil)?;
        // Scripts reach `string` through their read-only view; methods on strings go through
        // the string metatable, which getmetatable no longer returns.
        let string_meta: Table = lua.load("return getmetatable('')").eval()?;
        string_meta.raw_set("__metatable", false)?;
        globals.set(
            "unpack",
            globals.get::<Table>("table")?.get::<Value>("unpack")?,
        )?;
        let mut base = Vec::new();
        for name in BASE {
            base.push((name, globals.get::<Value>(name)?));
        }
        let check = meter.clone();
        let exhausted = lua.create_function(move |_, ()| Ok(check.exhausted().is_some()))?;
        let guards: Table = lua.load(GUARDS).set_name("=guards").call((
            globals.get::<Function>("pcall")?,
            globals.get::<Function>("xpcall")?,
            globals.get::<Function>("setmetatable")?,
            globals.get::<Function>("rawget")?,
            globals.get::<Function>("error")?,
            globals.get::<Function>("select")?,
            exhausted,
        ))?;
        let mut libraries = Vec::new();
        for name in ["string", "table", "math", "utf8"] {
            libraries.push((name, globals.get::<Table>(name)?));
        }
        // Nothing but the environments built here reaches the globals.
        for name in [
            "string",
            "table",
            "math",
            "utf8",
            "pcall",
            "xpcall",
            "setmetatable",
            "collectgarbage",
            "load",
            "dofile",
            "loadfile",
            "require",
            "rawset",
            "print",
        ] {
            globals.raw_set(name, Value::Nil)?;
        }
        Ok(Self {
            base,
            guards,
            libraries,
            words: api::words_table(lua, Arc::clone(&sources.words))?,
            os: api::os_table(lua)?,
            config: api::config_table(lua, &settings.config)?,
        })
    }

    /// A fresh environment for script `name`: its own globals, read-only views of the rest.
    fn environment(&self, lua: &Lua, name: &str, settings: &PolicySettings) -> mlua::Result<Table> {
        let env = lua.create_table()?;
        for (key, value) in &self.base {
            env.raw_set(*key, value.clone())?;
        }
        for key in ["pcall", "xpcall", "setmetatable"] {
            env.raw_set(key, self.guards.get::<Value>(key)?)?;
        }
        for (key, library) in &self.libraries {
            env.raw_set(*key, api::read_only(lua, library.clone())?)?;
        }
        env.raw_set("words", api::read_only(lua, self.words.clone())?)?;
        env.raw_set("os", api::read_only(lua, self.os.clone())?)?;
        env.raw_set("log", api::read_only(lua, api::log_table(lua, name)?)?)?;
        let own = settings
            .config
            .get(script_stem(name))
            .map(|value| api::to_lua(lua, value))
            .transpose()?;
        env.raw_set("config", api::layered(lua, own, self.config.clone())?)?;
        env.raw_set("_G", env.clone())?;
        Ok(env)
    }
}

/// `sensitive_words` for `sensitive_words.lua`: the script's namespace in `policy.config`.
fn script_stem(name: &str) -> &str {
    name.strip_suffix(".lua").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_charged_for_the_cpu_it_uses_not_for_waiting() {
        let meter = Meter::new(u64::MAX, Duration::from_millis(5));
        meter.start();
        // Waiting (as for a core on a loaded machine) uses no CPU.
        std::thread::sleep(Duration::from_millis(20));
        assert!(meter.charge(1).is_ok());
        let spinning = Instant::now();
        while meter.charge(1).is_ok() {
            assert!(spinning.elapsed() < Duration::from_secs(5), "never ran out");
        }
        assert_eq!(meter.exhausted(), Some(Exhausted::Deadline));
        meter.start();
        assert!(meter.charge(1).is_ok(), "a new call starts afresh");
    }
}
