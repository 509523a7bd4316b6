//! How to reach the server and who this device is.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls::ClientConfig;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::error::ClientError;

/// Where the server listens.
#[derive(Clone)]
pub enum Server {
    /// MQTT over TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// MQTT over TLS; a client certificate goes in the rustls configuration.
    Tls {
        /// Host name (checked against the server's certificate).
        host: String,
        /// Port.
        port: u16,
        /// Trust roots and, for certificate login, the client's certificate.
        config: Arc<ClientConfig>,
    },
    /// MQTT over WebSocket, e.g. `ws://host:18083/mqtt`.
    Ws {
        /// The URL.
        url: String,
    },
    /// MQTT over secure WebSocket.
    Wss {
        /// The URL (`wss://...`).
        url: String,
        /// Trust roots and an optional client certificate.
        config: Arc<ClientConfig>,
    },
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { host, port } => write!(f, "mqtt://{host}:{port}"),
            Self::Tls { host, port, .. } => write!(f, "mqtts://{host}:{port}"),
            Self::Ws { url } | Self::Wss { url, .. } => f.write_str(url),
        }
    }
}

/// Everything a client needs to connect. Built with [`ClientOptions::new`] and the `with_`
/// methods; the defaults suit a phone on a mobile network.
#[derive(Clone)]
pub struct ClientOptions {
    /// The server.
    pub server: Server,
    /// This user's IM id (the server derives it from the login; topics are built from it).
    pub uid: String,
    /// This device's MQTT client id: offline state is kept per device, so keep it stable.
    pub device_id: String,
    /// The MQTT username (the uid by default).
    pub username: String,
    /// The password or token, if the server asks for one.
    pub password: Option<String>,
    /// The server's IM topic prefix.
    pub prefix: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// First reconnect delay; it doubles per failed attempt, with jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How long a request waits for its answer.
    pub request_timeout: Duration,
    /// Messages per Pull or History page.
    pub page_size: u32,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server", &self.server)
            .field("uid", &self.uid)
            .field("device_id", &self.device_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// Options for `uid` on the device `device_id` (its MQTT client id).
    pub fn new(server: Server, uid: impl Into<String>, device_id: impl Into<String>) -> Self {
        let uid = uid.into();
        Self {
            server,
            username: uid.clone(),
            uid,
            device_id: device_id.into(),
            password: None,
            prefix: "im".into(),
            keep_alive: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            page_size: 50,
        }
    }

    /// Parses `mqtt://host:port`, `mqtts://host:port` (with `tls`), `ws://…` or `wss://…`.
    ///
    /// # Errors
    /// An unknown scheme, a missing port, or TLS asked for without a configuration.
    pub fn server_from_url(
        url: &str,
        tls: Option<Arc<ClientConfig>>,
    ) -> Result<Server, ClientError> {
        let bad = || ClientError::Options(format!("bad server URL {url:?}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let host_port = || -> Result<(String, u16), ClientError> {
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(bad)?;
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        };
        let need_tls = || {
            tls.clone()
                .ok_or_else(|| ClientError::Options(format!("{url} needs a TLS configuration")))
        };
        match scheme {
            "mqtt" | "tcp" => host_port().map(|(host, port)| Server::Tcp { host, port }),
            "mqtts" | "ssl" => {
                let (host, port) = host_port()?;
                Ok(Server::Tls {
                    host,
                    port,
                    config: need_tls()?,
                })
            }
            "ws" => Ok(Server::Ws {
                url: url.to_owned(),
            }),
            "wss" => Ok(Server::Wss {
                url: url.to_owned(),
                config: need_tls()?,
            }),
            _ => Err(bad()),
        }
    }

    /// Logs in with a password.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Logs in with a token (a JWT): sent as the password, the username being the uid.
    pub fn with_token(self, token: impl Into<String>) -> Self {
        self.with_password(token)
    }

    /// Logs in as `username` when it differs from the uid.
    pub fn with_username(mut self, username: impl Into<String>) -> Self {
        self.username = username.into();
        self
    }

    /// Another IM topic prefix (the server's `im.prefix`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Reconnect delays: from `min`, doubling to `max`, with jitter.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Checks the options and builds rumqttc's (MQTT 5, clean start, manual acks: a message
    /// is acknowledged only once it is in the local store).
    pub(crate) fn mqtt(&self) -> Result<MqttOptions, ClientError> {
        if self.uid.is_empty() || self.device_id.is_empty() {
            return Err(ClientError::Options(
                "uid and device_id must not be empty".into(),
            ));
        }
        if crate::model::ConversationId::parse(&format!("u/{}", self.uid)).is_none() {
            return Err(ClientError::Options(format!(
                "{:?} is not an IM user id",
                self.uid
            )));
        }
        let (host, port, transport) = match &self.server {
            Server::Tcp { host, port } => (host.clone(), *port, Transport::Tcp),
            Server::Tls { host, port, config } => (
                host.clone(),
                *port,
                Transport::tls_with_config(TlsConfiguration::Rustls(config.clone())),
            ),
            Server::Ws { url } => (url.clone(), url_port(url, 80), Transport::Ws),
            Server::Wss { url, config } => (
                url.clone(),
                url_port(url, 443),
                Transport::wss_with_config(TlsConfiguration::Rustls(config.clone())),
            ),
        };
        let mut options = MqttOptions::new(self.device_id.clone(), host, port);
        options
            .set_transport(transport)
            .set_keep_alive(self.keep_alive)
            .set_clean_start(true)
            .set_manual_acks(true)
            .set_request_channel_capacity(4096)
            // A digest of many conversations, with previews, is one packet.
            .set_max_packet_size(Some(MAX_PACKET));
        if let Some(password) = &self.password {
            options.set_credentials(self.username.clone(), password.clone());
        } else {
            options.set_credentials(self.username.clone(), "");
        }
        Ok(options)
    }
}

/// Largest packet this client accepts (rumqttc's default, 10 KiB, is less than a digest of
/// a hundred conversations with previews).
const MAX_PACKET: u32 = 4 * 1024 * 1024;

/// The port of a WebSocket URL (rumqttc takes it separately).
fn url_port(url: &str, default: u16) -> u16 {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(default)
}
