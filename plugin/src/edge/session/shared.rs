//! Shared subscriptions in a cluster: the hook layer holds `$share/{group}/{filter}` itself
//! rather than relaying it to rumqttd, so that each message goes to one member across all
//! nodes (the cluster picks the member; see `cluster::shared`). Without a cluster rumqttd
//! keeps them as before.

use super::Session;
use crate::edge::codec::Protocol;
use crate::edge::sink::SessionEvent;
use crate::wire::pb;

impl Session {
    /// Applies what reached this connection from outside it.
    pub(in crate::edge) fn on_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Device(event) => self.on_device_event(event),
            SessionEvent::Shared { filter, publish } => self.on_shared(&filter, &publish),
        }
    }

    /// Whether the hook layer (not rumqttd) holds `filter`: a shared subscription in a
    /// cluster.
    pub(super) fn shared_here(&self, filter: &str) -> bool {
        self.ctx.cluster.is_some() && filter.starts_with("$share/")
    }

    /// Joins the group of `shared` at `qos` (the SUBACK's code).
    pub(super) fn join_shared(&mut self, shared: &str, qos: u8) -> u8 {
        if let Some(cluster) = &self.ctx.cluster {
            cluster.join_shared(shared, self.id, std::sync::Arc::clone(&self.sink));
            self.shared.insert(shared.to_owned(), qos);
        }
        qos
    }

    /// Leaves the group of `shared`; whether the client was a member.
    pub(super) fn leave_shared(&mut self, shared: &str) -> bool {
        let held = self.shared.remove(shared).is_some();
        if let (Some(cluster), true) = (&self.ctx.cluster, held) {
            cluster.leave_shared(shared, self.id);
            self.release_routes(&[shared.to_owned()]);
        }
        held
    }

    /// The connection ends: it leaves every group; returns them for a persistent session.
    pub(super) fn leave_all_shared(&mut self) -> Vec<(String, u8)> {
        let shared: Vec<(String, u8)> = self.shared.drain().collect();
        if let Some(cluster) = &self.ctx.cluster {
            let filters: Vec<String> = shared.iter().map(|(filter, _)| filter.clone()).collect();
            for filter in &filters {
                cluster.leave_shared(filter, self.id);
                self.routes.remove(filter);
            }
            cluster.unsubscribed(&filters);
        }
        shared
    }

    /// A persistent session's shared subscriptions, joined again as it resumes.
    pub(super) fn rejoin_shared(&mut self, shared: Vec<(String, u8)>) {
        let Some(cluster) = self.ctx.cluster.clone() else {
            return;
        };
        let filters: Vec<String> = shared
            .into_iter()
            .map(|(filter, qos)| {
                self.join_shared(&filter, qos);
                self.routes.insert(filter.clone());
                filter
            })
            .collect();
        cluster.subscribed_soon(&filters);
    }

    /// A message of a group this connection is the chosen member of, at most at the QoS
    /// granted (gone if the client left the group meanwhile).
    fn on_shared(&mut self, filter: &str, publish: &pb::Forward) {
        let Some(granted) = self.shared.get(filter).copied() else {
            self.ctx.im.metrics().shared_undelivered.inc();
            return;
        };
        let qos = u8::try_from(publish.qos).unwrap_or(2).min(granted);
        let properties: &[u8] = match self.version {
            Protocol::V5 => &publish.properties,
            Protocol::V4 => &[],
        };
        self.outbox
            .own_publish(&publish.topic, qos, properties, &publish.payload);
    }
}
