//! How the IM service reaches one connection the hook layer owns.

use tokio::sync::mpsc;

use crate::im::{DeviceEvent, DeviceSink};

/// A connection as a [`DeviceSink`]: a bounded queue drained by the connection task.
#[derive(Debug)]
pub(crate) struct ConnectionSink {
    pub(super) events: mpsc::Sender<Box<DeviceEvent>>,
    /// Ends the connection as taken over; never lost to a full queue of a stalled client.
    pub(super) kick: tokio_util::sync::CancellationToken,
    /// Ends the connection as evicted by an operator; never lost either.
    pub(super) evict: tokio_util::sync::CancellationToken,
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
            event => self.events.try_send(Box::new(event)).is_ok(),
        }
    }
}
