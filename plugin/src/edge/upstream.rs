//! The private MQTT 5 link from one client connection to rumqttd, opened only once the
//! client needs rumqttd: IM topics never enter rumqttd, so a phone that only chats never
//! costs a rumqttd session, its buffers, or rumqttd's accept pacing.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::protocol::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Filter, LastWill, LastWillProperties,
    Login, Packet, Subscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::codec::{self, make_room, read_frame, Protocol, READ_SMALL};
use super::context::{EdgeContext, EDGE_USER};
use super::EdgeError;

/// Keep-alive of the private link to rumqttd; the hook layer pings it itself, so clients
/// may use any keep-alive, including 0.
const UPSTREAM_KEEP_ALIVE: u16 = 60;
/// How long a closing link waits for rumqttd to close it too.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Frames from rumqttd are trusted in size (rumqttd enforces the client's limits).
const UPSTREAM_MAX_FRAME: usize = usize::MAX >> 4;

/// What the link's CONNECT carries: the client's session flag and MQTT 5 properties (a
/// will makes the link open at CONNECT, so rumqttd can publish it).
pub(super) struct LinkRequest {
    /// The client id rumqttd knows the link by (see [`upstream_client_id`]).
    pub(super) client_id: String,
    pub(super) clean_session: bool,
    pub(super) properties: Option<ConnectProperties>,
    pub(super) will: Option<LastWill>,
    pub(super) will_properties: Option<LastWillProperties>,
}

/// An open link: its socket halves and what rumqttd sent that is not handled yet.
pub(super) struct Link {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    input: BytesMut,
    /// Room the last read had, and what it read.
    room: usize,
    read: usize,
    /// `mqtt_im_upstream_links`, given back when the link goes.
    _counted: Counted,
}

/// Holds one unit of a gauge while alive.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type Opening = BoxFuture<'static, Result<(Link, ConnAck), EdgeError>>;

/// A connection's link to rumqttd through its life.
pub(super) enum Upstream {
    /// Not needed (yet): what opening it will send.
    Unneeded(Box<LinkRequest>),
    /// CONNECT on its way; what the client sends rumqttd meanwhile waits in the caller's
    /// buffer.
    Opening(Opening),
    Open(Link),
    /// Closed, or failed to open.
    Gone,
}

/// What happened on the link.
pub(super) enum UpstreamEvent {
    /// rumqttd's CONNACK arrived; the link takes what was waiting.
    Opened,
    /// Bytes from rumqttd are ready in [`Upstream::next_frame`].
    Bytes,
    /// rumqttd closed the link.
    Closed,
    /// The link could not be opened.
    Failed(EdgeError),
}

impl Upstream {
    /// Makes rumqttd forget its session of `client_id`: a clean link of connection
    /// `owner` opened and closed with a DISCONNECT (the caller holds the client id's claim).
    pub(super) async fn discard_session(ctx: &Arc<EdgeContext>, owner: u64, client_id: &str) {
        let request = LinkRequest::as_client(client_id, true);
        if let Ok((mut upstream, _)) = Self::open_now(ctx, owner, request).await {
            let mut goodbye = BytesMut::from(&[codec::kind::DISCONNECT << 4, 0][..]);
            upstream.close(&mut goodbye, true).await;
        }
    }

    /// Opens the link now (a CONNECT with a will, or a session rumqttd keeps) and returns
    /// rumqttd's CONNACK, which may refuse.
    pub(super) async fn open_now(
        ctx: &Arc<EdgeContext>,
        connection: u64,
        request: LinkRequest,
    ) -> Result<(Self, ConnAck), EdgeError> {
        let (link, ack) = connect(Arc::clone(ctx), connection, request).await?;
        Ok((Self::Open(link), ack))
    }

    /// Starts opening the link if nobody has yet; never waits.
    pub(super) fn open(&mut self, ctx: &Arc<EdgeContext>, connection: u64) {
        if let Self::Unneeded(_) = self {
            if let Self::Unneeded(request) = std::mem::replace(self, Self::Gone) {
                tracing::debug!("linking to rumqttd");
                let opening = connect(Arc::clone(ctx), connection, *request);
                *self = Self::Opening(Box::pin(opening));
            }
        }
    }

    /// Whether the link is open or opening (rumqttd has, or will have, this client).
    pub(super) fn is_linked(&self) -> bool {
        matches!(self, Self::Opening(_) | Self::Open(_))
    }

    /// Whether the link is open, so a ping can go now.
    pub(super) fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// The next thing that happens on the link; pending forever while it is unneeded.
    /// Cancel-safe: a read or an opening interrupted here resumes on the next call.
    pub(super) async fn next(&mut self) -> UpstreamEvent {
        match self {
            Self::Open(link) => match link.rd.read_buf(&mut link.input).await {
                Ok(0) | Err(_) => UpstreamEvent::Closed,
                Ok(read) => {
                    link.read = read;
                    UpstreamEvent::Bytes
                }
            },
            Self::Opening(opening) => match opening.await {
                Ok((link, ack)) if ack.code == ConnectReturnCode::Success => {
                    *self = Self::Open(link);
                    UpstreamEvent::Opened
                }
                Ok(_) => {
                    *self = Self::Gone;
                    UpstreamEvent::Failed(EdgeError::Refused("rumqttd refused the link"))
                }
                Err(e) => {
                    *self = Self::Gone;
                    UpstreamEvent::Failed(e)
                }
            },
            Self::Unneeded(_) | Self::Gone => std::future::pending().await,
        }
    }

    /// The next whole frame rumqttd sent, if any.
    pub(super) fn next_frame(&mut self) -> Result<Option<codec::Frame>, EdgeError> {
        match self {
            Self::Open(link) => Ok(codec::next_frame(&mut link.input, UPSTREAM_MAX_FRAME)?),
            _ => Ok(None),
        }
    }

    /// Room for the next read from rumqttd (see [`make_room`]).
    pub(super) fn make_room(&mut self) {
        if let Self::Open(link) = self {
            link.room = make_room(&mut link.input, link.read, link.room);
        }
    }

    /// Writes `out` to rumqttd if the link is open (and empties it); while it opens, `out`
    /// keeps its bytes for later. Returns whether anything was written.
    pub(super) async fn write(&mut self, out: &mut BytesMut) -> Result<bool, EdgeError> {
        match self {
            Self::Open(link) if !out.is_empty() => {
                link.wr.write_all(out).await?;
                out.clear();
                Ok(true)
            }
            Self::Opening(_) => Ok(false),
            // Nothing there to send it to (only a connection's own DISCONNECT can be here).
            _ => {
                out.clear();
                Ok(false)
            }
        }
    }

    /// Subscribes the open link to `filters` (a session moved here from another node) and
    /// returns once rumqttd's SUBACK came; what rumqttd sends after it stays for the
    /// connection.
    pub(super) async fn subscribe_now(
        &mut self,
        ctx: &EdgeContext,
        filters: Vec<Filter>,
    ) -> Result<(), EdgeError> {
        if filters.is_empty() {
            return Ok(());
        }
        let Self::Open(link) = self else {
            return Err(EdgeError::Protocol("no link to subscribe on"));
        };
        let mut out = BytesMut::new();
        let subscribe = Subscribe { pkid: 1, filters };
        codec::write_packet(&mut out, Protocol::V5, Packet::Subscribe(subscribe, None))?;
        link.wr.write_all(&out).await?;
        // A fresh link: rumqttd answers the SUBSCRIBE before it sends anything else.
        let frame = timeout(
            ctx.broker.connect_timeout,
            read_frame(&mut link.rd, &mut link.input, UPSTREAM_MAX_FRAME),
        )
        .await
        .map_err(|_| EdgeError::Timeout("SUBACK from rumqttd"))??;
        if frame.kind() != codec::kind::SUBACK {
            return Err(EdgeError::Protocol(
                "rumqttd did not answer SUBSCRIBE first",
            ));
        }
        Ok(())
    }

    /// Closes the link, if there is one, and returns once rumqttd has closed it too (rumqttd
    /// 0.20 mishandles a new link of a client id whose old link is not gone yet). `pending`
    /// is what the client sent rumqttd last, such as its DISCONNECT; without a DISCONNECT
    /// (`graceful` false) rumqttd publishes the will. Returns whether there was a link.
    pub(super) async fn close(&mut self, pending: &mut BytesMut, graceful: bool) -> bool {
        if let Self::Opening(_) = self {
            if !matches!(self.next().await, UpstreamEvent::Opened) {
                return true;
            }
        }
        let Self::Open(link) = std::mem::replace(self, Self::Gone) else {
            return false;
        };
        let Link { mut rd, mut wr, .. } = link;
        if !pending.is_empty() {
            let _ = wr.write_all(pending).await;
            pending.clear();
        }
        if !graceful {
            let _ = wr.shutdown().await;
        }
        let mut rest = [0u8; 256];
        let _ = timeout(CLOSE_GRACE, async {
            while matches!(rd.read(&mut rest).await, Ok(n) if n > 0) {}
        })
        .await;
        true
    }
}

/// Connects to a private rumqttd listener, sends the CONNECT and reads rumqttd's CONNACK.
async fn connect(
    ctx: Arc<EdgeContext>,
    connection: u64,
    request: LinkRequest,
) -> Result<(Link, ConnAck), EdgeError> {
    let broker = ctx
        .broker_for(connection)
        .ok_or(EdgeError::Protocol("no private rumqttd listener"))?;
    let stream = timeout(ctx.broker.connect_timeout, TcpStream::connect(broker))
        .await
        .map_err(|_| EdgeError::Timeout("a link to rumqttd"))??;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let connect = Connect {
        keep_alive: UPSTREAM_KEEP_ALIVE,
        client_id: request.client_id,
        clean_session: request.clean_session,
    };
    let login = Login {
        username: EDGE_USER.into(),
        password: ctx.broker.secret.clone(),
    };
    let packet = Packet::Connect(
        connect,
        request.properties,
        request.will,
        request.will_properties,
        Some(login),
    );
    let mut out = BytesMut::new();
    codec::write_packet(&mut out, Protocol::V5, packet)?;
    wr.write_all(&out).await?;
    let mut input = BytesMut::with_capacity(READ_SMALL);
    let frame = timeout(
        ctx.broker.connect_timeout,
        read_frame(&mut rd, &mut input, UPSTREAM_MAX_FRAME),
    )
    .await
    .map_err(|_| EdgeError::Timeout("CONNACK from rumqttd"))??;
    let Packet::ConnAck(ack, _) = frame.decode_upstream()? else {
        return Err(EdgeError::Protocol(
            "rumqttd did not answer CONNECT with CONNACK",
        ));
    };
    let link = Link {
        rd,
        wr,
        input,
        room: 0,
        read: 0,
        _counted: Counted::new(&ctx.im.metrics().upstream_links),
    };
    Ok((link, ack))
}

impl LinkRequest {
    /// A link of the hook layer's own as `client_id`, to take or drop the session rumqttd
    /// keeps of it.
    pub(super) fn as_client(client_id: &str, clean_session: bool) -> Self {
        Self {
            client_id: upstream_client_id(client_id),
            clean_session,
            properties: None,
            will: None,
            will_properties: None,
        }
    }

    /// A link of the hook layer's own, named `name` (a client id no client's link can
    /// have: escaped ids use `%` only before two hex digits, hashed ones `%h`).
    pub(super) fn internal(name: &str) -> Self {
        Self {
            client_id: format!("%i{name}"),
            clean_session: true,
            properties: None,
            will: None,
            will_properties: None,
        }
    }
}

/// Longest client id passed to rumqttd as it is (escaped); longer ones are hashed.
const UPSTREAM_ID_MAX: usize = 256;

/// The client id rumqttd knows a client by: rumqttd refuses ids containing `+`, `#`, `/` or
/// `$`, which MQTT allows, so those (and `%`, the escape) are percent-encoded; an id that
/// would be longer than [`UPSTREAM_ID_MAX`] becomes `%h` and its SHA-256 (never an escape's
/// output, as `h` is no hex digit). Either way one client id always maps to the same link,
/// so rumqttd's persistent sessions and take-over work, and two ids never share one.
pub(super) fn upstream_client_id(client_id: &str) -> String {
    let mut escaped = String::with_capacity(client_id.len());
    for c in client_id.chars() {
        match c {
            '%' | '+' | '#' | '/' | '$' => escaped.push_str(&format!("%{:02X}", c as u32)),
            c => escaped.push(c),
        }
    }
    if escaped.len() <= UPSTREAM_ID_MAX {
        return escaped;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, client_id.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("%h{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_are_ones_rumqttd_accepts_and_never_shared() {
        assert_eq!(upstream_client_id("phone-1"), "phone-1");
        assert_eq!(upstream_client_id("clean retained"), "clean retained");
        assert_eq!(upstream_client_id("a/b+#$"), "a%2Fb%2B%23%24");
        // The escape itself is escaped: "a%2F" and "a/" stay apart.
        assert_eq!(upstream_client_id("a%2F"), "a%252F");
        let long = "x".repeat(65_535);
        let hashed = upstream_client_id(&long);
        assert!(hashed.starts_with("%h") && hashed.len() == 66);
        assert_ne!(hashed, upstream_client_id(&"x".repeat(65_534)));
        for id in ["a/b", &long, "#", "$SYS"] {
            assert!(!"+#/$".chars().any(|c| upstream_client_id(id).contains(c)));
        }
    }
}
