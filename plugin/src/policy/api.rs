//! The helpers scripts get from Rust: `words`, `log`, a read-only `config` and `os.time` /
//! `os.clock`. Scripts only ever see read-only views of them (built per script).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::{Lua, LuaString, Table, Value};

use super::settings::ConfigValue;
use super::words::WordList;

/// The word list a helper uses when the script names none.
pub(super) const DEFAULT_LIST: &str = "default";
/// Longest log line a script can write.
const MAX_LOG: usize = 512;

/// The list a helper names (borrowed from Lua: no copy per call), or the default one.
fn list<'a>(
    lists: &'a BTreeMap<String, WordList>,
    name: Option<&LuaString>,
) -> mlua::Result<&'a WordList> {
    let name = name.map(LuaString::to_str).transpose()?;
    let name = name.as_deref().unwrap_or(DEFAULT_LIST);
    lists.get(name).ok_or_else(|| {
        mlua::Error::RuntimeError(format!(
            "unknown word list {:?}",
            crate::text::clean(name, 64)
        ))
    })
}

/// `words.has(list)`, `words.find(text [, list])`, `words.mask(text [, mask [, list]])`.
pub(super) fn words_table(
    lua: &Lua,
    lists: Arc<BTreeMap<String, WordList>>,
) -> mlua::Result<Table> {
    let words = lua.create_table()?;
    let known = Arc::clone(&lists);
    words.set(
        "has",
        lua.create_function(move |_, name: String| Ok(known.contains_key(&name)))?,
    )?;
    let find_lists = Arc::clone(&lists);
    words.set(
        "find",
        lua.create_function(move |_, (text, name): (LuaString, Option<LuaString>)| {
            Ok(list(&find_lists, name.as_ref())?.find(&text.to_str()?))
        })?,
    )?;
    words.set(
        "mask",
        lua.create_function(
            move |lua, (text, mask, name): (LuaString, Option<LuaString>, Option<LuaString>)| {
                let mask = match mask {
                    Some(mask) => mask.to_str()?.chars().next().unwrap_or('*'),
                    None => '*',
                };
                let list = list(&lists, name.as_ref())?;
                let original = text.to_str()?;
                // Unmasked text goes back as the very string it came as.
                let masked = match list.mask(&original, mask) {
                    (Cow::Borrowed(_), count) => (text.clone(), count),
                    (Cow::Owned(masked), count) => (lua.create_string(masked)?, count),
                };
                Ok(masked)
            },
        )?,
    )?;
    Ok(words)
}

/// `os.time()` and `os.clock()`, nothing else of `os`.
pub(super) fn os_table(lua: &Lua) -> mlua::Result<Table> {
    let os = lua.create_table()?;
    os.set(
        "time",
        lua.create_function(|_, ()| {
            Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0))
        })?,
    )?;
    let started = std::time::Instant::now();
    os.set(
        "clock",
        lua.create_function(move |_, ()| Ok(started.elapsed().as_secs_f64()))?,
    )?;
    Ok(os)
}

/// The shared `policy.config` table.
pub(super) fn config_table(
    lua: &Lua,
    config: &BTreeMap<String, ConfigValue>,
) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    for (key, value) in config {
        table.set(key.as_str(), to_lua(lua, value)?)?;
    }
    Ok(table)
}

/// A script's `config`: its own namespace (`policy.config.<script>`) first, then the shared
/// table; read-only.
pub(super) fn layered(lua: &Lua, own: Option<Value>, shared: Table) -> mlua::Result<Table> {
    let own = match own {
        Some(Value::Table(own)) => Some(own),
        _ => None,
    };
    let merged = lua.create_table()?;
    for pair in shared.pairs::<Value, Value>() {
        let (key, value) = pair?;
        merged.raw_set(key, value)?;
    }
    if let Some(own) = own {
        for pair in own.pairs::<Value, Value>() {
            let (key, value) = pair?;
            merged.raw_set(key, value)?;
        }
    }
    read_only(lua, merged)
}

/// A per-script `log` table: lines are bounded, free of control characters (no forged log
/// lines) and tagged with the script's file name.
pub(super) fn log_table(lua: &Lua, script: &str) -> mlua::Result<Table> {
    let log = lua.create_table()?;
    for level in ["info", "warn", "error"] {
        let script = script.to_owned();
        let function = lua.create_function(move |_, message: mlua::LuaString| {
            let message = crate::text::clean(&message.to_string_lossy(), MAX_LOG);
            match level {
                "info" => tracing::info!(target: "mqtt_im::policy::script", script, "{message}"),
                "warn" => tracing::warn!(target: "mqtt_im::policy::script", script, "{message}"),
                _ => tracing::error!(target: "mqtt_im::policy::script", script, "{message}"),
            }
            Ok(())
        })?;
        log.set(level, function)?;
    }
    Ok(log)
}

/// A configuration value as Lua sees it; tables are read-only.
pub(super) fn to_lua(lua: &Lua, value: &ConfigValue) -> mlua::Result<Value> {
    Ok(match value {
        ConfigValue::Bool(b) => Value::Boolean(*b),
        ConfigValue::Int(i) => Value::Integer(*i),
        ConfigValue::Float(f) => Value::Number(*f),
        ConfigValue::Str(s) => Value::String(lua.create_string(s)?),
        ConfigValue::List(items) => {
            let table = lua.create_table()?;
            for item in items {
                table.push(to_lua(lua, item)?)?;
            }
            Value::Table(read_only(lua, table)?)
        }
        ConfigValue::Table(entries) => {
            let table = lua.create_table()?;
            for (key, item) in entries {
                table.set(key.as_str(), to_lua(lua, item)?)?;
            }
            Value::Table(read_only(lua, table)?)
        }
    })
}

/// An empty proxy whose reads go to `table` and whose writes fail; its metatable is hidden.
pub(super) fn read_only(lua: &Lua, table: Table) -> mlua::Result<Table> {
    let proxy = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", table.clone())?;
    meta.set(
        "__newindex",
        lua.create_function(|_, _: mlua::MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::RuntimeError("this table is read-only".into()))
        })?,
    )?;
    let length = table.clone();
    meta.set(
        "__len",
        lua.create_function(move |_, _: Table| Ok(length.raw_len()))?,
    )?;
    let next: mlua::Function = lua.globals().get("next")?;
    meta.set(
        "__pairs",
        lua.create_function(move |_, _: Table| Ok((next.clone(), table.clone(), Value::Nil)))?,
    )?;
    meta.set("__metatable", false)?;
    proxy.set_metatable(Some(meta))?;
    Ok(proxy)
}
