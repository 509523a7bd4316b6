//! How the IM service and the cluster's shared subscriptions reach one connection the hook
//! layer owns.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::im::{DeviceEvent, DeviceSink};
use crate::wire::pb;

/// What reaches a connection from outside it.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    /// From the IM service.
    Device(DeviceEvent),
    /// A publish for the connection's member of a shared subscription (`filter`, the whole
    /// `$share/{group}/{filter}`), chosen for it out of the group across the cluster.
    Shared {
        filter: Arc<str>,
        publish: Arc<pb::Forward>,
    },
    /// What the connection's session had queued on the node it moved from.
    Restored(Vec<pb::Forward>),
}

/// A connection as a [`DeviceSink`]: a bounded queue drained by the connection task.
#[derive(Debug)]
pub(crate) struct ConnectionSink {
    pub(super) events: mpsc::Sender<Box<SessionEvent>>,
    /// Ends the connection as taken over; never lost to a full queue of a stalled client.
    pub(super) kick: tokio_util::sync::CancellationToken,
    /// Ends the connection as evicted by an operator; never lost either.
    pub(super) evict: tokio_util::sync::CancellationToken,
}

impl ConnectionSink {
    /// Queues a shared subscription's publish; `false` if the connection is gone or
    /// saturated (another member may take it).
    pub(crate) fn shared(&self, filter: &Arc<str>, publish: &Arc<pb::Forward>) -> bool {
        let event = SessionEvent::Shared {
            filter: Arc::clone(filter),
            publish: Arc::clone(publish),
        };
        self.events.try_send(Box::new(event)).is_ok()
    }
}

impl ConnectionSink {
    /// Queues what a session moved from another node had queued there; `false` if the
    /// connection is gone or saturated.
    pub(crate) fn restored(&self, messages: Vec<pb::Forward>) -> bool {
        let event = SessionEvent::Restored(messages);
        self.events.try_send(Box::new(event)).is_ok()
    }
}

impl DeviceSink for ConnectionSink {
    fn push(&self, event: DeviceEvent) -> bool {
        match event {
            DeviceEvent::TakenOver => {
                self.kick.cancel();
                true
            }
            DeviceEvent::Evicted => {
                self.evict.cancel();
                true
            }
            event => self
                .events
                .try_send(Box::new(SessionEvent::Device(event)))
                .is_ok(),
        }
    }
}
