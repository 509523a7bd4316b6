//! One client connection: CONNECT handshake (auth, take-over), then a loop relaying packets
//! both ways (to rumqttd once the client needs it) and serving IM topics at packet
//! boundaries.

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

use super::codec::{self, kind, Version};
use super::handshake::{handshake, Arrival, Established};
use super::limits::DeviceSlot;
use super::links::LinkClaim;
use super::session::{End, Op, Session};
use super::transport::{ClientStream, Listener};
use super::upstream::{Upstream, UpstreamEvent};
use super::{ConnectionSink, EdgeContext, EdgeError};
use crate::im::DeviceEvent;
use crate::listener::ListenerKind;
use crate::metrics::ConnectionLabels;

/// How often the link to rumqttd is pinged when idle.
const UPSTREAM_PING: Duration = Duration::from_secs(20);
/// How long a connection the server ends waits for the client to hang up first.
const LINGER: Duration = Duration::from_millis(500);
/// Spare read buffer of a quiet connection side, and of a busy one.
pub(super) const READ_SMALL: usize = 512;
const READ_LARGE: usize = 64 << 10;
/// Outgoing buffers larger than this are given back once written (after a burst).
const WRITE_KEEP: usize = 4 << 10;
/// Live deliveries queued per connection before the device counts as busy.
const EVENT_QUEUE: usize = 1024;

/// The I/O of a live connection after a successful CONNECT: sockets, timers and the
/// ordered IM operations around its [`Session`].
pub(super) struct Connection {
    session: Session,
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
    /// The link to rumqttd, opened when the session asks for it.
    upstream: Upstream,
    /// Held until rumqttd has closed this connection's link.
    link: LinkClaim,
    ops: FuturesOrdered<Op>,
    /// Boxed: the queue's storage is allocated in blocks of slots, and an idle
    /// connection's first block then stays small.
    events_rx: mpsc::Receiver<Box<DeviceEvent>>,
    /// Cancelled when an operator evicts the connection.
    evicted: tokio_util::sync::CancellationToken,
    last_upstream_write: Instant,
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
                let connection = Connection::new(ctx, id, listener, established);
                let span = tracing::Span::current();
                // Any UTF-8 up to 64 KiB: log lines get a short, clean form.
                let client_id = crate::text::clean(
                    &connection.session.device.client_id,
                    crate::text::LOGGED_ID,
                );
                span.record("client_id", client_id.as_str());
                span.record(
                    "uid",
                    crate::text::clean(&connection.session.device.uid, crate::text::LOGGED_ID)
                        .as_str(),
                );
                let run = Box::pin(connection.run(shutdown));
                run.await;
            }
            Err(e) => tracing::debug!(error = %e, "connect failed"),
        }
    }
    .instrument(span)
    .await
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
        let evicted = tokio_util::sync::CancellationToken::new();
        let sink = Arc::new(ConnectionSink {
            events: events_tx,
            kick: link.kick.clone(),
            evict: evicted.clone(),
        });
        let linked = upstream.is_linked();
        let session = Session::new(ctx, id, terms, client_out, linked, sink);
        Self {
            session,
            device_slot,
            labels,
            client_rd,
            client_wr,
            client_in,
            client_room: 0,
            client_read: 0,
            upstream,
            link,
            ops: FuturesOrdered::new(),
            events_rx,
            evicted,
            last_upstream_write: Instant::now(),
        }
    }
}

fn connection_labels(listener: ListenerKind, version: Version) -> ConnectionLabels {
    ConnectionLabels {
        listener: listener.as_str(),
        protocol: version.name(),
    }
}

/// Makes room for the next read into `buf` and returns it, given what the last read got
/// (`read`) of the room it had (`room`): large after a read filled all the room (a burst gets
/// its bytes in few system calls), small again once a small read finds it drained (an idle
/// connection stays small), else as it is with at least a little room.
pub(super) fn make_room(buf: &mut BytesMut, read: usize, room: usize) -> usize {
    if read > 0 && read >= room {
        buf.reserve(READ_LARGE);
    } else if read < READ_SMALL && buf.is_empty() && buf.capacity() > 2 * READ_SMALL {
        *buf = BytesMut::with_capacity(READ_SMALL);
    } else {
        buf.reserve(READ_SMALL);
    }
    buf.capacity() - buf.len()
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
        let mut end = self.on_upstream_bytes().err().map(End::Failed);
        if end.is_none() {
            end = self.on_client_bytes().err().map(End::Failed);
        }
        while end.is_none() {
            self.apply_effects();
            self.reserve_reads();
            let reading = self.session.accepts_input();
            let step = tokio::select! {
                read = self.client_rd.read_buf(&mut self.client_in), if reading => match read {
                    Ok(0) | Err(_) => Err(End::ClientGone),
                    Ok(read) => {
                        self.client_read = read;
                        self.session.seen(Instant::now());
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
                () = until(self.session.read_resume) => {
                    self.session.read_resume = None;
                    self.on_client_bytes().map_err(End::Failed)
                }
                () = self.device_slot.close.cancelled() => Err(End::TooManyDevices),
            };
            if let Err(stop) = step {
                end = Some(stop);
            }
            self.apply_effects();
            if let Err(e) = self.flush().await {
                end.get_or_insert(End::Failed(e));
            }
            if self.session.client_disconnected {
                end.get_or_insert(End::ClientDisconnected);
            }
            if self.session.unstored {
                end.get_or_insert(End::Unstored);
            }
        }
        // Boxed: only an ending connection needs room for the goodbye.
        Box::pin(self.finish(end.unwrap_or(End::ClientGone))).await;
    }

    /// Carries out what the session asked for besides bytes: operations to start, the link
    /// to open.
    fn apply_effects(&mut self) {
        for op in self.session.take_started() {
            self.ops.push_back(op);
        }
        if self.session.take_open_link() {
            self.upstream.open(&self.session.ctx, self.session.id);
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
        if now.saturating_duration_since(self.session.last_seen()) >= UPSTREAM_PING
            && self.client_in.is_empty()
        {
            self.client_read = 0;
        }
        self.session.on_tick(now)?;
        if self.upstream.is_open() && self.last_upstream_write.elapsed() >= UPSTREAM_PING {
            self.session
                .up_out
                .extend_from_slice(&[kind::PINGREQ << 4, 0]);
        }
        Ok(())
    }

    fn on_client_bytes(&mut self) -> Result<(), EdgeError> {
        let max = self.session.listener.max_packet;
        while let Some(frame) = codec::next_frame(&mut self.client_in, max)? {
            self.session.on_client_frame(frame, Instant::now())?;
            // A client over its limits waits, even for what it already sent.
            if self.session.client_disconnected || self.session.read_resume.is_some() {
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
        let up_out = &mut self.session.up_out;
        if !up_out.is_empty() && self.upstream.write(up_out).await? {
            self.last_upstream_write = Instant::now();
        }
        let client_out = &mut self.session.client_out;
        if !client_out.is_empty() {
            self.client_wr.write_all(client_out).await?;
            // TLS and WebSocket buffer what is written.
            self.client_wr.flush().await?;
            client_out.clear();
            if client_out.capacity() > WRITE_KEEP {
                *client_out = BytesMut::new();
            }
        }
        let up_out = &mut self.session.up_out;
        if up_out.is_empty() && up_out.capacity() > WRITE_KEEP {
            *up_out = BytesMut::new();
        }
        Ok(())
    }

    async fn finish(mut self, end: End) {
        let connections = &self.session.ctx.im.metrics().connections;
        connections.get_or_create(&self.labels).dec();
        // Answer what was already accepted before the socket goes (e.g. on shutdown); a
        // SUBSCRIBE among them still counts for the session kept below.
        self.apply_effects();
        while let Some(outcome) = self.ops.next().await {
            if self.session.on_outcome(outcome).is_err() {
                break;
            }
            self.apply_effects();
        }
        self.session.leave(&end);
        if self.session.im_uid().is_some() {
            self.session.ctx.im.left(&self.session.device).await;
        }
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
        let linked = self
            .upstream
            .close(&mut self.session.up_out, graceful)
            .await;
        if linked && !self.session.clean_session {
            let ctx = &self.session.ctx;
            ctx.keep_upstream_session(&self.session.device.client_id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_grow_for_bursts_and_shrink_back_when_quiet() {
        let mut buf = BytesMut::new();
        let room = make_room(&mut buf, 0, 0);
        assert!((READ_SMALL..2 * READ_SMALL).contains(&room), "{room}");
        // A read that filled the room: the next one gets a large buffer.
        let room = make_room(&mut buf, room, room);
        assert!(room >= READ_LARGE);
        // A busy stream (reads larger than small, not filling) keeps it.
        let kept = make_room(&mut buf, 4 * READ_SMALL, room);
        assert!(kept >= READ_LARGE);
        // A small read that leaves nothing pending: back to small.
        let room = make_room(&mut buf, 2, kept);
        assert!(buf.capacity() < 2 * READ_SMALL && room >= READ_SMALL);
        // Not while a partial frame waits in it.
        buf.extend_from_slice(&[0x30; 10]);
        let _ = make_room(&mut buf, room, room);
        let room = make_room(&mut buf, 2, READ_LARGE);
        assert!(room >= READ_LARGE - 10);
    }
}
