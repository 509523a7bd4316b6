//! The link that injects other nodes' publishes into this node's rumqttd: one MQTT 5
//! connection of the hook layer's own, writing each publish with its topic, QoS, retain flag
//! and properties as its publisher sent them, so rumqttd delivers it to this node's
//! subscribers as it would a local client's. Reconnects by itself; what was in flight when
//! the link broke is lost (counted).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use rumqttd::protocol::ConnectReturnCode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::edge::codec::{self, kind, Frame, Protocol};
use crate::edge::upstream::{LinkRequest, Upstream, UpstreamEvent};
use crate::edge::EdgeContext;
use crate::wire::pb;

/// Publishes at QoS 1 or 2 waiting for rumqttd's answer at most.
const WINDOW: usize = 1024;
/// How often the idle link is pinged.
const PING: Duration = Duration::from_secs(20);
/// A topic no subscription matches (rumqttd matches no filter to a `$` topic): its PUBACK
/// says rumqttd has handled every publish written before it on the link.
const FLUSH_TOPIC: &[u8] = b"$mqtt-im/flush";

/// What the injector is asked to do.
#[derive(Debug)]
pub(super) enum Injection {
    /// Write a publish into rumqttd.
    Publish(pb::Forward),
    /// Answer once rumqttd has handled everything injected before.
    Flush(oneshot::Sender<()>),
}

/// Injects forwarded publishes into this node's rumqttd.
#[derive(Debug)]
pub(crate) struct Injector {
    ctx: Arc<EdgeContext>,
    name: String,
}

impl Injector {
    /// The injector of node `node`, linking to the rumqttd behind `ctx`.
    pub(crate) fn new(ctx: Arc<EdgeContext>, node: &str) -> Self {
        Self {
            ctx,
            name: format!("cluster-{node}"),
        }
    }

    /// Injects what `queue` brings until `shutdown`, relinking after a failure.
    pub(super) async fn run(
        self,
        mut queue: mpsc::Receiver<Injection>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let request = LinkRequest::internal(&self.name);
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                opened = Upstream::open_now(&self.ctx, 0, request) => opened,
            };
            match opened {
                Ok((upstream, ack)) if ack.code == ConnectReturnCode::Success => {
                    backoff = Duration::from_millis(100);
                    if !self.serve(upstream, &mut queue, &shutdown).await {
                        return;
                    }
                    tracing::warn!("cluster injection link lost; relinking");
                }
                Ok(_) => tracing::warn!("rumqttd refused the cluster injection link"),
                Err(e) => tracing::warn!(error = %e, "cluster injection link failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes publishes into `upstream` until it fails (`true`: relink) or the queue or the
    /// server ends (`false`).
    async fn serve(
        &self,
        mut upstream: Upstream,
        queue: &mut mpsc::Receiver<Injection>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut window = Window::new(self.ctx.im.metrics().forwards_injected.clone());
        let mut out = BytesMut::new();
        let mut ping = tokio::time::interval(PING);
        loop {
            upstream.make_room();
            let go_on = tokio::select! {
                () = shutdown.cancelled() => return false,
                injection = queue.recv(), if window.has_room() => match injection {
                    Some(Injection::Publish(publish)) => {
                        window.write(&publish, &mut out);
                        true
                    }
                    Some(Injection::Flush(done)) => {
                        window.flush(done, &mut out);
                        true
                    }
                    None => return false,
                },
                event = upstream.next() => match event {
                    UpstreamEvent::Opened | UpstreamEvent::Bytes => {
                        self.on_frames(&mut upstream, &mut window, &mut out)
                    }
                    UpstreamEvent::Closed | UpstreamEvent::Failed(_) => false,
                },
                _ = ping.tick() => {
                    out.extend_from_slice(&[kind::PINGREQ << 4, 0]);
                    true
                }
            };
            if go_on && !out.is_empty() && upstream.write(&mut out).await.is_err() {
                break;
            }
            if !go_on {
                break;
            }
        }
        let lost = window.in_flight.len() - window.flushes.len();
        for _ in 0..lost {
            self.ctx.im.metrics().count_forward_failed("injector");
        }
        true
    }

    /// rumqttd's answers to what was injected; `false` if the link is no longer usable.
    fn on_frames(&self, upstream: &mut Upstream, window: &mut Window, out: &mut BytesMut) -> bool {
        loop {
            match upstream.next_frame() {
                Ok(Some(frame)) => window.answered(&frame, out),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Packet ids of the injected publishes rumqttd has not answered yet.
#[derive(Debug)]
struct Window {
    /// Publishes rumqttd has taken (QoS 0 once written).
    injected: Counter,
    next: u16,
    in_flight: HashSet<u16>,
    /// Flushes waiting for the PUBACK of their marker.
    flushes: HashMap<u16, oneshot::Sender<()>>,
}

impl Window {
    fn new(injected: Counter) -> Self {
        Self {
            injected,
            next: 0,
            in_flight: HashSet::new(),
            flushes: HashMap::new(),
        }
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < WINDOW
    }

    fn write(&mut self, publish: &pb::Forward, out: &mut BytesMut) {
        let qos = u8::try_from(publish.qos.min(2)).unwrap_or(0);
        let pkid = if qos > 0 {
            self.allocate()
        } else {
            self.injected.inc();
            0
        };
        let flags = (qos << 1) | u8::from(publish.retain);
        codec::write_publish(
            out,
            Protocol::V5,
            flags,
            publish.topic.as_bytes(),
            pkid,
            &publish.properties,
            &publish.payload,
        );
    }

    /// A QoS 1 marker whose PUBACK answers `done`.
    fn flush(&mut self, done: oneshot::Sender<()>, out: &mut BytesMut) {
        let pkid = self.allocate();
        self.flushes.insert(pkid, done);
        codec::write_publish(out, Protocol::V5, 1 << 1, FLUSH_TOPIC, pkid, &[], &[]);
    }

    fn allocate(&mut self) -> u16 {
        loop {
            self.next = self.next.checked_add(1).unwrap_or(1);
            if self.in_flight.insert(self.next) {
                return self.next;
            }
        }
    }

    /// PUBACK and PUBCOMP end an exchange; PUBREC asks for the PUBREL.
    fn answered(&mut self, frame: &Frame, out: &mut BytesMut) {
        let Ok(pkid) = frame.ack_pkid() else {
            return;
        };
        match frame.kind() {
            kind::PUBACK | kind::PUBCOMP => {
                self.in_flight.remove(&pkid);
                match self.flushes.remove(&pkid) {
                    Some(done) => {
                        let _ = done.send(());
                    }
                    None => {
                        self.injected.inc();
                    }
                }
            }
            kind::PUBREC => codec::write_ack(out, kind::PUBREL, pkid),
            _ => {}
        }
    }
}
