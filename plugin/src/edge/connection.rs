//! One client connection: CONNECT handshake (auth, take-over), then a loop that feeds the
//! client's [`Session`] what arrives (frames from the client and from rumqttd, finished IM
//! operations, device events, clock ticks) and carries out the effects it returns: writing
//! bytes both ways, starting IM operations in order, opening the rumqttd link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{self, kind, make_room, Protocol};
use super::handshake::{handshake, Arrival, Established};
use super::limits::DeviceSlot;
use super::links::LinkClaim;
use super::session::{Effects, End, Op, Session};
use super::sink::{ConnectionSink, SessionEvent};
use super::transport::{ClientStream, Listener};
use super::upstream::{Upstream, UpstreamEvent};
use super::{EdgeContext, EdgeError};
use crate::listener::ListenerKind;
use crate::metrics::ConnectionLabels;

/// How often the link to rumqttd is pinged when idle.
const UPSTREAM_PING: Duration = Duration::from_secs(20);
/// How long a connection the server ends waits for the client to hang up first.
const LINGER: Duration = Duration::from_millis(500);
/// Live deliveries queued per connection before the device counts as busy.
const EVENT_QUEUE: usize = 1024;

/// The I/O of a live connection after a successful CONNECT: sockets, timers and the
/// ordered IM operations around its [`Session`].
pub(super) struct Connection {
    session: Session,
    ctx: Arc<EdgeContext>,
    id: u64,
    /// The largest packet the client may send on its listener.
    max_packet: usize,
    /// This connection's place in its user's device count (given back when it ends).
    device_slot: DeviceSlot,
    /// The listener and protocol the connection is counted under.
    labels: ConnectionLabels,
    client_rd: ReadHalf<ClientStream>,
    client_wr: WriteHalf<ClientStream>,
    client_in: BytesMut,
    /// Room the last read from the client had, and what it read.
    client_room: usize,
    client_read: usize,
    /// When the client last sent something.
    last_read: Instant,
    /// Bytes for the client, and for rumqttd (they wait here while the link opens).
    to_client: BytesMut,
    to_rumqttd: BytesMut,
    /// The link to rumqttd, opened when the session asks for it.
    upstream: Upstream,
    /// Held until rumqttd has closed this connection's link.
    link: LinkClaim,
    ops: FuturesOrdered<Op>,
    /// Boxed: the queue's storage is allocated in blocks of slots, and an idle
    /// connection's first block then stays small.
    events_rx: mpsc::Receiver<Box<SessionEvent>>,
    /// Cancelled when an operator evicts the connection.
    evicted: CancellationToken,
    last_upstream_write: Instant,
    /// Why the connection ends, once something said so.
    end: Option<End>,
}

/// Serves one accepted socket to its end: transport upgrade (TLS, WebSocket), CONNECT, loop.
pub(super) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    profile: Arc<Listener>,
    ctx: Arc<EdgeContext>,
    id: u64,
    shutdown: CancellationToken,
) {
    let listener = profile.kind();
    let span = tracing::info_span!("connection", id, %peer, %listener, client_id = tracing::field::Empty, uid = tracing::field::Empty);
    async move {
        // Each stage in a box of its own: a connection's task then holds only the stage it
        // is in (an idle connection does not keep room for the handshake's futures).
        let upgrading = Box::pin(profile.upgrade(tcp));
        let upgraded = match timeout(profile.connect_timeout, upgrading).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => return tracing::debug!(error = %e, "transport handshake failed"),
            Err(_) => return tracing::debug!("transport handshake timed out"),
        };
        let arrival = Arrival {
            id,
            peer,
            listener: profile,
        };
        match Box::pin(handshake(upgraded, Arc::clone(&ctx), &arrival)).await {
            Ok(established) => {
                record_identity(&established);
                let connection = Connection::new(ctx, id, listener, established);
                let run = Box::pin(connection.run(shutdown));
                run.await;
            }
            Err(e) => tracing::debug!(error = %e, "connect failed"),
        }
    }
    .instrument(span)
    .await
}

/// The connection's span gains the client id and uid (any UTF-8 up to 64 KiB: log lines get a
/// short, clean form).
fn record_identity(established: &Established) {
    let span = tracing::Span::current();
    let terms = &established.terms;
    let logged = |id: &str| crate::text::clean(id, crate::text::LOGGED_ID);
    span.record("client_id", logged(&terms.client_id).as_str());
    span.record("uid", logged(&terms.client.uid).as_str());
}

impl Connection {
    /// The connection loop's state for an established client.
    fn new(
        ctx: Arc<EdgeContext>,
        id: u64,
        listener: ListenerKind,
        established: Established,
    ) -> Self {
        let Established {
            terms,
            device_slot,
            client,
            client_in,
            client_out,
            upstream,
            link,
        } = established;
        let (client_rd, client_wr) = tokio::io::split(client);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        tracing::debug!(version = ?terms.version, keep_alive = terms.keep_alive, "connected");
        let labels = connection_labels(listener, terms.version);
        ctx.im.metrics().connects.get_or_create(&labels).inc();
        ctx.im.metrics().connections.get_or_create(&labels).inc();
        let evicted = CancellationToken::new();
        let sink = Arc::new(ConnectionSink {
            events: events_tx,
            kick: link.kick.clone(),
            evict: evicted.clone(),
        });
        let max_packet = terms.listener.max_packet;
        let linked = upstream.is_linked();
        let session = Session::new(Arc::clone(&ctx), id, terms, linked, sink);
        Self {
            session,
            ctx,
            id,
            max_packet,
            device_slot,
            labels,
            client_rd,
            client_wr,
            client_in,
            client_room: 0,
            client_read: 0,
            last_read: Instant::now(),
            // The CONNACK, first of all.
            to_client: client_out,
            to_rumqttd: BytesMut::new(),
            upstream,
            link,
            ops: FuturesOrdered::new(),
            events_rx,
            evicted,
            last_upstream_write: Instant::now(),
            end: None,
        }
    }
}

fn connection_labels(listener: ListenerKind, version: Protocol) -> ConnectionLabels {
    ConnectionLabels {
        listener: listener.as_str(),
        protocol: version.name(),
    }
}

/// Completes at `at`, never without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Connection {
    async fn run(mut self, shutdown: CancellationToken) {
        let tick = self.session.keep_alive().map_or(UPSTREAM_PING, |k| {
            (k / 3).clamp(Duration::from_millis(250), UPSTREAM_PING)
        });
        let mut ticker = tokio::time::interval(tick);
        let expiry = self.session.expiry().map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Instant::now() + left
        });
        // Packets that arrived together with the CONNECT, and with rumqttd's CONNACK (a
        // resumed session's queued messages).
        if let Err(e) = self
            .on_upstream_bytes()
            .and_then(|()| self.on_client_bytes())
        {
            self.end.get_or_insert(End::Failed(e));
        }
        while self.end.is_none() {
            self.carry_out_effects();
            self.reserve_reads();
            let reading = self.session.accepts_input();
            let step = tokio::select! {
                read = self.client_rd.read_buf(&mut self.client_in), if reading => match read {
                    Ok(0) | Err(_) => Err(End::ClientGone),
                    Ok(read) => {
                        self.client_read = read;
                        self.last_read = Instant::now();
                        self.session.seen(self.last_read);
                        self.on_client_bytes().map_err(End::Failed)
                    }
                },
                event = self.upstream.next() => match event {
                    UpstreamEvent::Opened | UpstreamEvent::Bytes => {
                        self.on_upstream_bytes().map_err(End::Failed)
                    }
                    UpstreamEvent::Closed => Err(End::UpstreamGone),
                    UpstreamEvent::Failed(e) => Err(End::Failed(e)),
                },
                Some(outcome) = self.ops.next(), if !self.ops.is_empty() => {
                    self.session.on_outcome(outcome).map_err(End::Failed)
                }
                Some(event) = self.events_rx.recv() => {
                    self.session.on_event(*event);
                    Ok(())
                }
                _ = ticker.tick() => self.on_tick(),
                () = shutdown.cancelled() => Err(End::Shutdown),
                () = self.link.kick.cancelled() => Err(End::TakenOver),
                () = self.evicted.cancelled() => Err(End::Evicted),
                () = until(expiry) => Err(End::CredentialsExpired),
                () = until(self.session.reads_paused_until()) => {
                    self.session.resume_reads();
                    self.on_client_bytes().map_err(End::Failed)
                }
                () = self.device_slot.close.cancelled() => Err(End::TooManyDevices),
            };
            if let Err(stop) = step {
                self.end.get_or_insert(stop);
            }
            self.carry_out_effects();
            if let Err(e) = self.flush().await {
                self.end.get_or_insert(End::Failed(e));
            }
        }
        let end = self.end.take().unwrap_or(End::ClientGone);
        // Boxed: only an ending connection needs room for the goodbye.
        Box::pin(self.finish(end)).await;
    }

    /// Carries out what the session asked for: bytes to send, operations to start, the
    /// link to open, the end of the connection.
    fn carry_out_effects(&mut self) {
        let Effects {
            to_client,
            to_rumqttd,
            started,
            open_link,
            end,
        } = self.session.take_effects();
        self.to_client.unsplit(to_client);
        self.to_rumqttd.unsplit(to_rumqttd);
        for op in started {
            self.ops.push_back(op);
        }
        if open_link {
            self.upstream.open(&self.ctx, self.id);
        }
        if let Some(end) = end {
            self.end.get_or_insert(end);
        }
    }

    /// Room for the next reads (see [`make_room`]).
    fn reserve_reads(&mut self) {
        self.client_room = make_room(&mut self.client_in, self.client_read, self.client_room);
        self.upstream.make_room();
    }

    fn on_tick(&mut self) -> Result<(), End> {
        let now = Instant::now();
        // Quiet since the last tick: a buffer left large by a burst is given back (a client
        // without keep-alive may never send the small read that would do it).
        if now.saturating_duration_since(self.last_read) >= UPSTREAM_PING
            && self.client_in.is_empty()
        {
            self.client_read = 0;
        }
        self.session.on_tick(now)?;
        if self.upstream.is_open() && self.last_upstream_write.elapsed() >= UPSTREAM_PING {
            self.to_rumqttd.extend_from_slice(&[kind::PINGREQ << 4, 0]);
        }
        Ok(())
    }

    fn on_client_bytes(&mut self) -> Result<(), EdgeError> {
        while let Some(frame) = codec::next_frame(&mut self.client_in, self.max_packet)? {
            self.session.on_client_frame(frame, Instant::now())?;
            // A client over its limits waits, even for what it already sent.
            if self.session.reading_stopped() {
                break;
            }
        }
        Ok(())
    }

    fn on_upstream_bytes(&mut self) -> Result<(), EdgeError> {
        while let Some(frame) = self.upstream.next_frame()? {
            self.session.on_upstream_frame(frame)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), EdgeError> {
        if !self.to_rumqttd.is_empty() && self.upstream.write(&mut self.to_rumqttd).await? {
            self.last_upstream_write = Instant::now();
        }
        if !self.to_client.is_empty() {
            self.client_wr.write_all(&self.to_client).await?;
            // TLS and WebSocket buffer what is written.
            self.client_wr.flush().await?;
            self.to_client.clear();
        }
        Ok(())
    }

    async fn finish(mut self, end: End) {
        let connections = &self.ctx.im.metrics().connections;
        connections.get_or_create(&self.labels).dec();
        // Answer what was already accepted before the socket goes (e.g. on shutdown); a
        // SUBSCRIBE among them still counts for the session kept below.
        self.carry_out_effects();
        while let Some(outcome) = self.ops.next().await {
            if self.session.on_outcome(outcome).is_err() {
                break;
            }
            self.carry_out_effects();
        }
        self.session.leave(&end);
        if let Some(device) = self.session.im_device() {
            self.ctx.im.left(device).await;
        }
        self.carry_out_effects();
        let _ = self.flush().await;
        match &end {
            End::Failed(e) => tracing::info!(error = %e, "connection closed on error"),
            other => tracing::debug!(reason = ?other, "connection closed"),
        }
        // rumqttd 0.20 frees the connection id when it handles DISCONNECT and again when
        // the socket closes, and mishandles a new link of a client id whose old link is not
        // gone yet; so the link is closed (without DISCONNECT, rumqttd publishes the will)
        // and this waits until rumqttd has closed it too, before the client id is released.
        let graceful = matches!(end, End::ClientDisconnected);
        if self.upstream.close(&mut self.to_rumqttd, graceful).await {
            self.session.link_closed();
        }
        let Self {
            mut client_rd,
            mut client_wr,
            link,
            ..
        } = self;
        // The client id is free for a newer connection from here.
        drop(link);
        if !matches!(end, End::ClientDisconnected | End::ClientGone) {
            // Closed by the server: the client gets a moment to read the last answers (and
            // a DISCONNECT) and to hang up itself; some clients drop what they read together
            // with the end of the stream.
            let mut rest = [0u8; 256];
            let _ = timeout(LINGER, async {
                while matches!(client_rd.read(&mut rest).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        let _ = client_wr.shutdown().await;
    }
}
