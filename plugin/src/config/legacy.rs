//! Time settings as they were spelled before every one became a [`Period`]: a whole number
//! of milliseconds (or seconds) under a key ending in `_ms` (or `_s`). Files and variables
//! written that way keep working: a source wrapped in [`Renamed`] gives each such key its
//! new name and its value a unit.

use config::{Map, Source, Value, ValueKind};

use super::Period;

/// Old key (its path, arrays left out) → new name in the same table, and milliseconds per
/// unit of the old value.
const RENAMED: [(&str, &str, u64); 16] = [
    ("broker.connect_timeout_ms", "connect_timeout", 1),
    ("auth.reload_interval_ms", "reload_interval", 1),
    ("auth.providers.timeout_ms", "timeout", 1),
    ("auth.providers.cache_ttl_ms", "cache_ttl", 1),
    ("auth.providers.leeway_s", "leeway", 1000),
    ("store.postgres.connect_timeout_ms", "connect_timeout", 1),
    ("store.postgres.call_timeout_ms", "call_timeout", 1),
    ("im.receipt_interval_ms", "receipt_interval", 1),
    ("im.removal_poll_ms", "removal_poll", 1),
    ("im.live_ack_flush_ms", "live_ack_flush", 1),
    ("cluster.heartbeat_ms", "heartbeat", 1),
    ("cluster.node_ttl_ms", "node_ttl", 1),
    ("cluster.redis_timeout_ms", "redis_timeout", 1),
    ("policy.call_timeout_ms", "call_timeout", 1),
    ("policy.queue_timeout_ms", "queue_timeout", 1),
    ("policy.reload_interval_ms", "reload_interval", 1),
];

/// A configuration source whose old time keys read as their new ones.
#[derive(Debug, Clone)]
pub(super) struct Renamed<S>(pub(super) S);

impl<S: Source + Clone + Send + Sync + 'static> Source for Renamed<S> {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        let mut table = self.0.collect()?;
        rename(&mut table, "").map_err(config::ConfigError::Message)?;
        Ok(table)
    }
}

/// Renames the old keys in `table`, found at `path`; keys may be dotted paths themselves
/// (as environment variables give them) or nest tables and arrays of tables (as files do).
fn rename(table: &mut Map<String, Value>, path: &str) -> Result<(), String> {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if let Some((_, new_name, unit)) = RENAMED.iter().find(|(old, ..)| *old == full) {
            let Some(value) = table.remove(&key) else {
                continue;
            };
            let new_key = match key.rsplit_once('.') {
                Some((parent, _)) => format!("{parent}.{new_name}"),
                None => (*new_name).to_owned(),
            };
            let new_full = match full.rsplit_once('.') {
                Some((parent, _)) => format!("{parent}.{new_name}"),
                None => (*new_name).to_owned(),
            };
            if table.contains_key(&new_key) {
                return Err(format!("{full} and {new_full}: set only {new_full}"));
            }
            let period = as_period(&value, *unit).ok_or_else(|| {
                format!("{full}: a whole number (the old spelling of {new_full} = \"…ms\")")
            })?;
            let origin = value.origin().map(str::to_owned);
            let text = ValueKind::String(period.to_string());
            table.insert(new_key, Value::new(origin.as_ref(), text));
            continue;
        }
        match table.get_mut(&key).map(|value| &mut value.kind) {
            Some(ValueKind::Table(inner)) => rename(inner, &full)?,
            Some(ValueKind::Array(items)) => {
                for item in items {
                    if let ValueKind::Table(inner) = &mut item.kind {
                        rename(inner, &full)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// An old value (`unit` milliseconds each) as a period.
fn as_period(value: &Value, unit: u64) -> Option<Period> {
    let count: u64 = match &value.kind {
        ValueKind::I64(n) => u64::try_from(*n).ok()?,
        ValueKind::U64(n) => *n,
        ValueKind::I128(n) => u64::try_from(*n).ok()?,
        ValueKind::U128(n) => u64::try_from(*n).ok()?,
        ValueKind::String(text) => text.trim().parse().ok()?,
        _ => return None,
    };
    count.checked_mul(unit).map(Period::millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(toml: &str) -> Result<config::Config, config::ConfigError> {
        let file = config::File::from_str(toml, config::FileFormat::Toml);
        config::Config::builder().add_source(Renamed(file)).build()
    }

    #[test]
    fn old_keys_read_as_periods_under_their_new_names() {
        let raw = read(
            "[cluster]\nheartbeat_ms = 250\n[auth]\n[[auth.providers]]\ntype = \"jwt\"\nleeway_s = 3",
        )
        .unwrap();
        assert_eq!(raw.get_string("cluster.heartbeat").unwrap(), "250ms");
        assert!(raw.get_string("cluster.heartbeat_ms").is_err());
        let providers = raw.get_array("auth.providers").unwrap();
        let jwt = providers[0].clone().into_table().unwrap();
        assert_eq!(jwt["leeway"].clone().into_string().unwrap(), "3s");
    }

    #[test]
    fn both_spellings_or_a_bad_old_value_are_refused() {
        let both = read("[im]\nremoval_poll_ms = 5\nremoval_poll = \"5ms\"").unwrap_err();
        assert!(
            both.to_string().contains("set only im.removal_poll"),
            "{both}"
        );
        let bad = read("[im]\nremoval_poll_ms = \"soon\"").unwrap_err();
        assert!(
            bad.to_string()
                .contains("im.removal_poll_ms: a whole number"),
            "{bad}"
        );
    }
}
