//! The public listeners the hook layer serves, whichever file describes them: mqtt-im's own
//! `[listeners]` (one port per transport, both MQTT versions, the `[auth]` chain) or the
//! `[v4.N]`/`[v5.N]`/`[ws.N]` sections of a team's `rumqttd.toml`, each with its own limits
//! and credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::domain::{ListenerKind, Protocol};
use crate::settings::Problems;

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
    pub connect_timeout: Duration,
    /// Packets of one connection the hook layer works on at once (waiting for the store, a
    /// hook or the policy) before it stops reading from the client, as rumqttd reads at most
    /// `max_inflight_count` packets before handing them on; 1,024 when `None`.
    pub max_pending: Option<usize>,
    /// Who may connect.
    pub auth: ListenerAuth,
}

impl Settings {
    /// The listeners this `[listeners]` section describes, with the `[tls]` certificates and
    /// the `[broker]` packet size and connect timeout.
    pub fn specs(&self, tls: &TlsSettings, broker: &crate::broker::Settings) -> Vec<ListenerSpec> {
        let settings = self;
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
                    tls: secure.then(|| tls.clone()),
                    ws_path: web.then(|| settings.ws_path.clone()),
                    protocol: None,
                    max_packet: broker.max_packet_size,
                    connect_timeout: broker.connect_timeout.0,
                    max_pending: None,
                    auth: ListenerAuth::Chain,
                })
            })
            .collect()
    }
}

/// Public listeners; one port serves MQTT 3.1.1 and MQTT 5 (the CONNECT tells them apart).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Plain TCP address; port 0 picks a free port.
    pub mqtt: SocketAddr,
    /// MQTT over TLS (needs `tls.cert` and `tls.key`).
    #[serde(default)]
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket, for browsers.
    #[serde(default)]
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (needs `tls.cert` and `tls.key`).
    #[serde(default)]
    pub wss: Option<SocketAddr>,
    /// The HTTP path of the WebSocket listeners (mqtt.js and Paho use `/mqtt`).
    pub ws_path: String,
    /// HTTP address of Prometheus `/metrics` and the `/status` JSON.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl Settings {
    /// Whether a listener needs the `[tls]` certificate.
    pub fn use_tls(&self) -> bool {
        self.tls.is_some() || self.wss.is_some()
    }
}

/// Whether TLS clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Clients authenticate with username and password only.
    None,
    /// A client may present a certificate signed by `tls.client_ca`; its subject's common
    /// name is then its uid, without a password.
    Optional,
    /// Every TLS client must present such a certificate.
    Required,
}

/// Certificates of the `tls` and `wss` listeners (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates.
    pub client_ca: PathBuf,
    /// Whether clients present certificates.
    pub client_auth: ClientAuth,
}

impl Settings {
    /// Values that parse but cannot work, and certificate files that are not there.
    pub fn check(&self, tls: &TlsSettings, problems: &mut Problems) {
        problems.check(
            self.ws_path.starts_with('/'),
            "listeners.ws_path: must start with '/'",
        );
        if self.use_tls() {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                problems.check(
                    path.is_file(),
                    &format!(
                        "{key}: {:?} is not a readable file (needed by listeners.tls/wss)",
                        path.display().to_string()
                    ),
                );
            }
        }
        if tls.client_auth != ClientAuth::None {
            problems.check(
                tls.client_ca.is_file(),
                &format!(
                    "tls.client_ca: {:?} is not a readable file (needed by tls.client_auth)",
                    tls.client_ca.display().to_string()
                ),
            );
        }
    }
}
