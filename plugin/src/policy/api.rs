//! The helpers scripts get from Rust: `words`, `log`, a read-only `config` and `os.time` /
//! `os.clock`.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::{Lua, Table, Value};

use super::words::WordList;
use crate::config::ConfigValue;

/// The word list a helper uses when the script names none.
pub(super) const DEFAULT_LIST: &str = "default";

/// Installs `words`, `config` and `os` into `globals`.
pub(super) fn install(
    lua: &Lua,
    globals: &Table,
    lists: Arc<BTreeMap<String, WordList>>,
    config: &BTreeMap<String, ConfigValue>,
) -> mlua::Result<()> {
    globals.set("words", words_table(lua, lists)?)?;
    let config_table = lua.create_table()?;
    for (key, value) in config {
        config_table.set(key.as_str(), to_lua(lua, value)?)?;
    }
    globals.set("config", read_only(lua, config_table)?)?;
    let os = lua.create_table()?;
    os.set(
        "time",
        lua.create_function(|_, ()| {
            Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0))
        })?,
    )?;
    let started = std::time::Instant::now();
    os.set(
        "clock",
        lua.create_function(move |_, ()| Ok(started.elapsed().as_secs_f64()))?,
    )?;
    globals.set("os", os)?;
    Ok(())
}

fn list(lists: &BTreeMap<String, WordList>, name: Option<String>) -> mlua::Result<&WordList> {
    let name = name.unwrap_or_else(|| DEFAULT_LIST.to_owned());
    lists
        .get(&name)
        .ok_or_else(|| mlua::Error::RuntimeError(format!("unknown word list {name:?}")))
}

fn words_table(lua: &Lua, lists: Arc<BTreeMap<String, WordList>>) -> mlua::Result<Table> {
    let words = lua.create_table()?;
    let known = Arc::clone(&lists);
    words.set(
        "has",
        lua.create_function(move |_, name: String| Ok(known.contains_key(&name)))?,
    )?;
    let find_lists = Arc::clone(&lists);
    words.set(
        "find",
        lua.create_function(move |_, (text, name): (String, Option<String>)| {
            Ok(list(&find_lists, name)?.find(&text))
        })?,
    )?;
    words.set(
        "mask",
        lua.create_function(
            move |_, (text, mask, name): (String, Option<String>, Option<String>)| {
                let mask = mask.and_then(|m| m.chars().next()).unwrap_or('*');
                Ok(list(&lists, name)?.mask(&text, mask))
            },
        )?,
    )?;
    Ok(words)
}

/// A per-script `log` table: messages carry the script's name.
pub(super) fn log_table(lua: &Lua, script: &str) -> mlua::Result<Table> {
    let log = lua.create_table()?;
    for level in ["info", "warn", "error"] {
        let script = script.to_owned();
        let function = lua.create_function(move |_, message: String| {
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

fn to_lua(lua: &Lua, value: &ConfigValue) -> mlua::Result<Value> {
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

/// An empty proxy whose reads go to `table` and whose writes fail.
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
    meta.set(
        "__pairs",
        lua.create_function(move |lua, _: Table| {
            let next: mlua::Function = lua.globals().get("next")?;
            Ok((next, table.clone(), Value::Nil))
        })?,
    )?;
    meta.set("__metatable", false)?;
    proxy.set_metatable(Some(meta))?;
    Ok(proxy)
}
