//! A team's own `rumqttd.toml`, adopted unchanged: its listeners are served by the hook
//! layer with their own TLS, limits and credentials; its router, bridge, console and
//! `[metrics]` run in the embedded rumqttd behind it; `[prometheus] listen` becomes the
//! metrics address. Every key mqtt-im treats differently from rumqttd is named in
//! [`Adopted::notes`], logged at start-up and printed by `check-config`, never dropped
//! silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ConfigError;
use crate::listener::{ClientAuth, TlsSettings};
use crate::listener::{ListenerAuth, ListenerKind, ListenerSpec, Protocol};

/// Bytes of one commit-log segment of rumqttd's router at most. rumqttd ships 100 MiB × 10
/// segments per topic filter, which lets its memory grow by a gigabyte per filter; IM
/// traffic never enters the router, so other topics keep at most 4 MiB × 4 per filter.
pub const MAX_SEGMENT_SIZE: usize = 4 << 20;
/// Commit-log segments per topic filter at most (see [`MAX_SEGMENT_SIZE`]).
pub const MAX_SEGMENT_COUNT: usize = 4;

/// What mqtt-im makes of a `rumqttd.toml`.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// The public listeners, served by the hook layer.
    pub listeners: Vec<ListenerSpec>,
    /// What runs behind the hook layer: the file's id, router (capped), bridge, console and
    /// `[metrics]`, without listeners or `[prometheus]`.
    pub broker: rumqttd::Config,
    /// `[prometheus] listen`: where mqtt-im serves `/metrics` (and `/status`).
    pub metrics: Option<SocketAddr>,
    /// Keys mqtt-im treats differently from rumqttd, one line each.
    pub notes: Vec<String>,
}

/// Reads `path` as rumqttd's binary does (the `config` crate, TOML).
///
/// # Errors
/// The file cannot be read or does not fit rumqttd's configuration, one line per problem.
pub fn load(path: &Path) -> Result<rumqttd::Config, ConfigError> {
    read(path)
}

/// `path` as TOML, deserialized into `T`.
fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        })
}

/// Keys of `path` that rumqttd 0.20 does not know (the shipped sample has some, such as
/// `throttle_delay_ms`): rumqttd ignores them silently, mqtt-im names them.
///
/// # Errors
/// The file cannot be read as TOML.
pub fn unknown_keys(path: &Path) -> Result<Vec<String>, ConfigError> {
    let raw: serde_json::Value = read(path)?;
    let mut unknown = Vec::new();
    walk(&raw, "", &SCHEMA, &mut unknown);
    Ok(unknown
        .into_iter()
        .map(|key| format!("{key}: not a rumqttd 0.20 setting; ignored, as rumqttd ignores it"))
        .collect())
}

/// What a table of rumqttd's configuration may hold.
enum Keys {
    /// These keys, each with what its value may hold.
    Fixed(&'static [(&'static str, Keys)]),
    /// Any keys (listener numbers, filters, users), each holding this.
    Any(&'static Keys),
    /// A value that is not checked further.
    Leaf,
}

const CONNECTIONS: Keys = Keys::Fixed(&[
    ("connection_timeout_ms", Keys::Leaf),
    ("max_payload_size", Keys::Leaf),
    ("max_inflight_count", Keys::Leaf),
    ("auth", Keys::Leaf),
    ("dynamic_filters", Keys::Leaf),
]);

const SERVER: Keys = Keys::Fixed(&[
    ("name", Keys::Leaf),
    ("listen", Keys::Leaf),
    (
        "tls",
        Keys::Fixed(&[
            ("capath", Keys::Leaf),
            ("certpath", Keys::Leaf),
            ("keypath", Keys::Leaf),
            ("pkcs12path", Keys::Leaf),
            ("pkcs12pass", Keys::Leaf),
        ]),
    ),
    ("next_connection_delay_ms", Keys::Leaf),
    ("connections", CONNECTIONS),
]);

const SCHEMA: Keys = Keys::Fixed(&[
    ("id", Keys::Leaf),
    (
        "router",
        Keys::Fixed(&[
            ("max_connections", Keys::Leaf),
            ("max_outgoing_packet_count", Keys::Leaf),
            ("max_segment_size", Keys::Leaf),
            ("max_segment_count", Keys::Leaf),
            ("custom_segment", Keys::Leaf),
            ("initialized_filters", Keys::Leaf),
            ("shared_subscriptions_strategy", Keys::Leaf),
        ]),
    ),
    ("v4", Keys::Any(&SERVER)),
    ("v5", Keys::Any(&SERVER)),
    ("ws", Keys::Any(&SERVER)),
    ("cluster", Keys::Leaf),
    ("console", Keys::Fixed(&[("listen", Keys::Leaf)])),
    (
        "bridge",
        Keys::Fixed(&[
            ("name", Keys::Leaf),
            ("addr", Keys::Leaf),
            ("qos", Keys::Leaf),
            ("sub_path", Keys::Leaf),
            ("reconnection_delay", Keys::Leaf),
            ("ping_delay", Keys::Leaf),
            ("connections", CONNECTIONS),
            ("transport", Keys::Leaf),
        ]),
    ),
    (
        "prometheus",
        Keys::Fixed(&[
            ("port", Keys::Leaf),
            ("listen", Keys::Leaf),
            ("interval", Keys::Leaf),
        ]),
    ),
    ("metrics", Keys::Leaf),
]);

/// Collects the keys under `value` that `keys` does not allow, named from `at`.
fn walk(value: &serde_json::Value, at: &str, keys: &Keys, unknown: &mut Vec<String>) {
    let Some(table) = value.as_object() else {
        return;
    };
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (key, inner) in entries {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        match keys {
            Keys::Leaf => {}
            Keys::Any(each) => walk(inner, &path, each, unknown),
            Keys::Fixed(known) => match known.iter().find(|(name, _)| name == key) {
                Some((_, each)) => walk(inner, &path, each, unknown),
                None => unknown.push(crate::text::clean(&path, 128)),
            },
        }
    }
}

/// Maps a rumqttd configuration onto the hook layer and the embedded rumqttd.
///
/// # Errors
/// A listener mqtt-im cannot serve as configured (native-tls PKCS#12 certificates), or no
/// listener at all; one line per problem.
pub fn adopt(config: rumqttd::Config) -> Result<Adopted, ConfigError> {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let mut listeners = Vec::new();
    let sections = [
        ("v4", &config.v4, Protocol::V4),
        ("v5", &config.v5, Protocol::V5),
        ("ws", &config.ws, Protocol::V4),
    ];
    for (section, servers, protocol) in sections {
        let mut servers: Vec<_> = servers.iter().flatten().collect();
        servers.sort_by(|a, b| a.0.cmp(b.0));
        for (key, server) in servers {
            let name = format!("{section}.{key}");
            match listener(&name, section == "ws", protocol, server, &mut notes) {
                Ok(spec) => listeners.push(spec),
                Err(problem) => problems.push(problem),
            }
        }
    }
    if listeners.is_empty() && problems.is_empty() {
        problems.push("at least one [v4.N], [v5.N] or [ws.N] listener is needed".into());
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    let metrics = prometheus_listen(&config, &mut notes);
    let broker = behind_the_hook_layer(config, &mut notes);
    Ok(Adopted {
        listeners,
        broker,
        metrics,
        notes,
    })
}

/// One `[v4.N]`/`[v5.N]`/`[ws.N]` section as a hook-layer listener.
fn listener(
    name: &str,
    web: bool,
    protocol: Protocol,
    server: &rumqttd::ServerSettings,
    notes: &mut Vec<String>,
) -> Result<ListenerSpec, String> {
    let connections = &server.connections;
    let tls = match &server.tls {
        None => None,
        Some(rumqttd::TlsConfig::NativeTls { .. }) => {
            return Err(format!(
                "{name}.tls: native-tls (pkcs12path) is not supported; give certpath and keypath as PEM files"
            ))
        }
        Some(rumqttd::TlsConfig::Rustls {
            capath,
            certpath,
            keypath,
        }) => {
            if capath.is_some() {
                notes.push(format!(
                    "{name}.tls.capath: clients must present a certificate signed by it; its common name is the client's uid (rumqttd's verify-client-cert behaviour)"
                ));
            }
            Some(TlsSettings {
                cert: PathBuf::from(certpath),
                key: PathBuf::from(keypath),
                client_ca: capath.as_deref().map(PathBuf::from).unwrap_or_default(),
                client_auth: if capath.is_some() {
                    ClientAuth::Required
                } else {
                    ClientAuth::None
                },
            })
        }
    };
    let kind = match (web, tls.is_some()) {
        (false, false) => ListenerKind::Tcp,
        (false, true) => ListenerKind::Tls,
        (true, false) => ListenerKind::Ws,
        (true, true) => ListenerKind::Wss,
    };
    if server.next_connection_delay_ms > 0 {
        notes.push(format!(
            "{name}.next_connection_delay_ms: not applied; the hook layer accepts without delay (limits.max_connections_per_listener bounds a listener)"
        ));
    }
    if !connections.dynamic_filters {
        notes.push(format!(
            "{name}.connections.dynamic_filters = false: not applied; a publish to a topic no subscription has created is accepted, where rumqttd would disconnect the client"
        ));
    }
    let auth = match (&connections.external_auth, &connections.auth) {
        (Some(handler), _) => ListenerAuth::External(std::sync::Arc::clone(handler)),
        (None, Some(table)) => ListenerAuth::Table(table.clone().into_iter().collect()),
        (None, None) => {
            notes.push(format!(
                "{name}: no connections.auth table: open to every client, as in rumqttd; IM topics need a checked identity there (an auth table, a client certificate, or users or providers in [auth] of the mqtt-im file)"
            ));
            ListenerAuth::Open
        }
    };
    Ok(ListenerSpec {
        name: name.to_owned(),
        addr: server.listen,
        kind,
        tls,
        ws_path: None,
        protocol: Some(protocol),
        max_packet: connections.max_payload_size,
        connect_timeout: Duration::from_millis(u64::from(connections.connection_timeout_ms)),
        max_pending: Some(connections.max_inflight_count.max(1)),
        auth,
    })
}

/// `[prometheus] listen` (or its deprecated `port`, on all interfaces as rumqttd does).
fn prometheus_listen(config: &rumqttd::Config, notes: &mut Vec<String>) -> Option<SocketAddr> {
    let prometheus = serde_json::to_value(config.prometheus.as_ref()?).ok()?;
    notes.push(
        "prometheus: mqtt-im's metrics (and /status) are served at its listen address, read on request (interval is not used)".into(),
    );
    let listen = prometheus.get("listen").and_then(|v| v.as_str());
    if let Some(addr) = listen.and_then(|listen| listen.parse().ok()) {
        return Some(addr);
    }
    let port = prometheus.get("port").and_then(serde_json::Value::as_u64)?;
    let port = u16::try_from(port).ok()?;
    Some(SocketAddr::from(([0, 0, 0, 0], port)))
}

/// The part of the file the embedded rumqttd runs: router (capped), bridge, console,
/// `[metrics]` and id; the listeners are the hook layer's.
fn behind_the_hook_layer(config: rumqttd::Config, notes: &mut Vec<String>) -> rumqttd::Config {
    let mut router = config.router;
    cap_segments(
        "router",
        &mut router.max_segment_size,
        &mut router.max_segment_count,
        notes,
    );
    if let Some(custom) = router.custom_segment.as_mut() {
        let mut filters: Vec<_> = custom.iter_mut().collect();
        filters.sort_by(|a, b| a.0.cmp(b.0));
        for (filter, segment) in filters {
            cap_segments(
                &format!("router.custom_segment.'{filter}'"),
                &mut segment.max_segment_size,
                &mut segment.max_segment_count,
                notes,
            );
        }
    }
    if config.console.is_some() {
        notes.push("console: served by rumqttd behind the hook layer; it lists one link per client (the hook layer's, under the client's id) and no IM traffic".into());
    }
    if config.cluster.is_some() {
        notes.push("cluster: not used (rumqttd 0.20 does not run it either); mqtt-im nodes cluster through [cluster] in the mqtt-im file".into());
    }
    if let Some(bridge) = &config.bridge {
        if matches!(bridge.transport, rumqttd::Transport::Tls { .. }) {
            notes.push("bridge.transport.tls: this build of rumqttd has no TLS for bridges; the bridge will fail to connect".into());
        }
    }
    rumqttd::Config {
        id: config.id,
        router,
        v4: None,
        v5: None,
        ws: None,
        cluster: None,
        console: config.console,
        bridge: config.bridge,
        prometheus: None,
        metrics: config.metrics,
    }
}

/// Caps one segment setting to [`MAX_SEGMENT_SIZE`] × [`MAX_SEGMENT_COUNT`], noting it.
fn cap_segments(key: &str, size: &mut usize, count: &mut usize, notes: &mut Vec<String>) {
    if *size > MAX_SEGMENT_SIZE || *count > MAX_SEGMENT_COUNT {
        let capped = (
            (*size).min(MAX_SEGMENT_SIZE),
            (*count).min(MAX_SEGMENT_COUNT),
        );
        notes.push(format!(
            "{key}: {} × {} segments would let memory grow by {} MiB per topic filter; capped to {} × {}",
            size,
            count,
            size.saturating_mul(*count) >> 20,
            capped.0,
            capped.1
        ));
        (*size, *count) = capped;
    }
}
