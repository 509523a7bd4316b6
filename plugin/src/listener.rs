//! The public listeners the hook layer serves, whichever file describes them: mqtt-im's own
//! `[listeners]` (one port per transport, both MQTT versions, the `[auth]` chain) or the
//! `[v4.N]`/`[v5.N]`/`[ws.N]` sections of a team's `rumqttd.toml`, each with its own limits
//! and credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::config::{Config, TlsSettings};
pub use crate::edge::ListenerKind;

/// The MQTT version a listener is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 only (rumqttd's `v4` and `ws` listeners).
    V4,
    /// MQTT 5 only (rumqttd's `v5` listeners).
    V5,
}

/// Who a listener admits.
#[derive(Clone)]
pub enum ListenerAuth {
    /// The `[auth]` provider chain of the mqtt-im configuration.
    Chain,
    /// Exactly these usernames with these clear-text passwords (a rumqttd
    /// `connections.auth` table); the username is the uid.
    Table(BTreeMap<String, String>),
    /// Whoever the embedding service's rumqttd auth handler (`set_auth_handler`) accepts;
    /// the username is the uid. As in rumqttd, it takes precedence over a table.
    External(rumqttd::AuthHandler),
    /// Everyone, as a rumqttd listener without an `auth` table.
    Open,
}

impl std::fmt::Debug for ListenerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Chain => f.write_str("Chain"),
            Self::Table(users) => f.debug_tuple("Table").field(&users.keys()).finish(),
            Self::External(_) => f.write_str("External"),
            Self::Open => f.write_str("Open"),
        }
    }
}

/// One public listener.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Its name: `v4.1`-style for rumqttd's sections, the transport for mqtt-im's own.
    pub name: String,
    /// The address; port 0 picks a free one.
    pub addr: SocketAddr,
    /// What carries MQTT on it.
    pub kind: ListenerKind,
    /// Certificate, key and client CA for the TLS kinds.
    pub tls: Option<TlsSettings>,
    /// The HTTP path WebSocket clients must ask for; any path when `None`.
    pub ws_path: Option<String>,
    /// The only MQTT version it serves; both when `None`.
    pub protocol: Option<Protocol>,
    /// Largest packet a client may send, in bytes.
    pub max_packet: usize,
    /// Time a new connection has for its transport handshake, then again for CONNECT.
    pub connect_timeout_ms: u64,
    /// Packets of one connection the hook layer works on at once (waiting for the store, a
    /// hook or the policy) before it stops reading from the client, as rumqttd reads at most
    /// `max_inflight_count` packets before handing them on; 1,024 when `None`.
    pub max_pending: Option<usize>,
    /// Who may connect.
    pub auth: ListenerAuth,
}

/// The listeners mqtt-im's own `[listeners]`, `[tls]` and `[broker]` describe.
pub fn from_config(config: &Config) -> Vec<ListenerSpec> {
    let settings = &config.listeners;
    let wanted = [
        (Some(settings.mqtt), ListenerKind::Tcp),
        (settings.tls, ListenerKind::Tls),
        (settings.ws, ListenerKind::Ws),
        (settings.wss, ListenerKind::Wss),
    ];
    wanted
        .into_iter()
        .filter_map(|(addr, kind)| {
            let secure = matches!(kind, ListenerKind::Tls | ListenerKind::Wss);
            let web = matches!(kind, ListenerKind::Ws | ListenerKind::Wss);
            Some(ListenerSpec {
                name: kind.as_str().to_owned(),
                addr: addr?,
                kind,
                tls: secure.then(|| config.tls.clone()),
                ws_path: web.then(|| settings.ws_path.clone()),
                protocol: None,
                max_packet: config.broker.max_packet_size,
                connect_timeout_ms: config.broker.connect_timeout_ms,
                max_pending: None,
                auth: ListenerAuth::Chain,
            })
        })
        .collect()
}
