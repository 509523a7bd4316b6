//! The public transports: plain TCP, TLS, WebSocket and WebSocket over TLS. Each accepted
//! socket is upgraded here into a byte stream carrying MQTT packets, so the rest of the hook
//! layer serves every transport with the same code.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use ws_stream_tungstenite::WsStream;

use super::codec::Protocol;
use super::EdgeError;
use crate::listener::{ClientAuth, ListenerKind, TlsSettings};

/// A client's byte stream, whatever carries it.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

/// An upgraded client connection.
pub(crate) type ClientStream = Box<dyn ClientIo>;

/// What carries MQTT on a listener; the TLS ones hold their TLS configuration.
#[derive(Clone)]
pub(crate) enum Transport {
    Tcp,
    Tls(TlsAcceptor),
    Ws,
    Wss(TlsAcceptor),
}

/// A public listener: how it turns accepted sockets into MQTT byte streams, and what it
/// admits (each of rumqttd's `[v4.N]`, `[v5.N]` and `[ws.N]` listeners has its own).
pub(crate) struct Listener {
    /// The listener's name (`v4.1`-style, or its kind), for hooks and logs.
    pub(crate) name: Arc<str>,
    pub(crate) transport: Transport,
    /// The HTTP path WebSocket clients must ask for; any path when `None` (as rumqttd).
    pub(crate) ws_path: Option<Arc<str>>,
    /// Largest packet a client may send, in bytes.
    pub(crate) max_packet: usize,
    /// Time a new connection has for its transport handshake, then again for CONNECT.
    pub(crate) connect_timeout: Duration,
    /// Who may connect.
    pub(crate) admission: Admission,
    /// The only MQTT version served, if the listener is version-bound (rumqttd's `v4`/`v5`).
    pub(crate) version: Option<Protocol>,
    /// A connection's packets the hook layer works on at once before it stops reading.
    pub(crate) max_pending: Option<usize>,
}

/// Who a listener admits.
pub(crate) enum Admission {
    /// The `[auth]` provider chain.
    Chain,
    /// Only these usernames with these passwords (a rumqttd `connections.auth` table); the
    /// username is the uid.
    Table(Arc<crate::auth::Authenticator>),
    /// Whoever the embedding service's rumqttd auth handler accepts; the username is the uid.
    External(rumqttd::AuthHandler),
    /// Everyone, as a rumqttd listener without an `auth` table; the uid follows
    /// `auth.uid_from`.
    Open,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Chain => "Chain",
            Self::Table(_) => "Table",
            Self::External(_) => "External",
            Self::Open => "Open",
        })
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("kind", &self.kind())
            .field("ws_path", &self.ws_path)
            .field("max_packet", &self.max_packet)
            .field("admission", &self.admission)
            .finish_non_exhaustive()
    }
}

/// A client stream and what the transport proved about the client.
pub(crate) struct Upgraded {
    pub(crate) stream: ClientStream,
    /// The common name of a verified client certificate: the client's uid.
    pub(crate) certified_uid: Option<String>,
}

impl Transport {
    /// Which kind of listener carries this transport.
    pub(crate) fn kind(&self) -> ListenerKind {
        match self {
            Transport::Tcp => ListenerKind::Tcp,
            Transport::Tls(_) => ListenerKind::Tls,
            Transport::Ws => ListenerKind::Ws,
            Transport::Wss(_) => ListenerKind::Wss,
        }
    }
}

impl Listener {
    /// The listener kind, for spans and metrics.
    pub(crate) fn kind(&self) -> ListenerKind {
        self.transport.kind()
    }

    /// TLS handshake and/or WebSocket upgrade of an accepted socket.
    pub(crate) async fn upgrade(&self, tcp: TcpStream) -> Result<Upgraded, EdgeError> {
        match &self.transport {
            Transport::Tcp => Ok(plain(tcp)),
            Transport::Ws => Ok(plain(self.websocket(tcp).await?)),
            Transport::Tls(tls) => {
                let stream = tls.accept(tcp).await?;
                let certified_uid = certified_uid(stream.get_ref().1);
                Ok(Upgraded {
                    stream: Box::new(stream),
                    certified_uid,
                })
            }
            Transport::Wss(tls) => {
                let stream = tls.accept(tcp).await?;
                let certified_uid = certified_uid(stream.get_ref().1);
                Ok(Upgraded {
                    stream: Box::new(self.websocket(stream).await?),
                    certified_uid,
                })
            }
        }
    }

    /// The WebSocket handshake: the configured path, subprotocol `mqtt`; then binary
    /// messages as one byte stream (an MQTT packet may span messages and vice versa).
    // tungstenite's handshake callback returns its (large) `ErrorResponse` by value.
    #[allow(clippy::result_large_err)]
    async fn websocket<S>(&self, stream: S) -> Result<impl ClientIo, EdgeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let path = self.ws_path.clone();
        let check = move |request: &Request, mut response: Response| {
            if path
                .as_deref()
                .is_some_and(|path| request.uri().path() != path)
            {
                return Err(refusal(StatusCode::NOT_FOUND));
            }
            let offers_mqtt = request
                .headers()
                .get_all("Sec-WebSocket-Protocol")
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .any(|protocol| protocol.trim().eq_ignore_ascii_case("mqtt"));
            if !offers_mqtt {
                return Err(refusal(StatusCode::BAD_REQUEST));
            }
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
            Ok(response)
        };
        // Room for a largest packet with its header, and a small one sent along with it.
        let max_message = self.max_packet.saturating_mul(2);
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let socket =
            async_tungstenite::tokio::accept_hdr_async_with_config(stream, check, Some(config))
                .await
                .map_err(|e| EdgeError::WebSocket(e.to_string()))?;
        Ok(WsStream::new(socket))
    }
}

fn plain(stream: impl ClientIo + 'static) -> Upgraded {
    Upgraded {
        stream: Box::new(stream),
        certified_uid: None,
    }
}

fn refusal(status: StatusCode) -> ErrorResponse {
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    response
}

/// The subject common name of the client's certificate, which rustls has verified against
/// `tls.client_ca` (it offers none unless client certificates are configured).
fn certified_uid(session: &tokio_rustls::rustls::ServerConnection) -> Option<String> {
    let certificate = session.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let common_name = parsed.subject().iter_common_name().next()?;
    common_name.as_str().ok().map(str::to_owned)
}

/// The TLS configuration of the `tls` and `wss` listeners, from the configured PEM files.
///
/// # Errors
/// A file cannot be read or parsed, or the key does not fit the certificate.
pub(crate) fn tls_acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject, server::WebPkiClientVerifier};

    let read_certs = |key: &str, path: &std::path::Path| {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| format!("{key} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{key} {}: no PEM certificate in it",
                path.display()
            ));
        }
        Ok(certs)
    };
    let chain = read_certs("tls.cert", &settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| format!("tls.key {}: {e}", settings.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if settings.client_auth == ClientAuth::None {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs("tls.client_ca", &settings.client_ca)? {
            roots
                .add(ca)
                .map_err(|e| format!("tls.client_ca {}: {e}", settings.client_ca.display()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if settings.client_auth == ClientAuth::Optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
