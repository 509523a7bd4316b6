//! Shared subscriptions in a cluster: the hook layer holds `$share/{group}/{filter}` itself
//! rather than relaying it to rumqttd, so that each message goes to one member across all
//! nodes (the cluster picks the member; see `cluster::shared`). Without a cluster rumqttd
//! keeps them as before.

use rumqttd::protocol::Filter;

use super::Session;
use crate::edge::codec::Protocol;
use crate::wire::pb;

impl Session {
    /// Whether the hook layer (not rumqttd) holds `filter`: a shared subscription in a
    /// cluster.
    pub(super) fn shared_here(&self, filter: &str) -> bool {
        self.ctx.cluster.is_some() && filter.starts_with("$share/")
    }

    /// Joins the group of `shared` at its QoS (the SUBACK's code).
    pub(super) fn join_shared(&mut self, shared: &Filter) -> u8 {
        let qos = shared.qos as u8;
        if let Some(cluster) = &self.ctx.cluster {
            cluster.join_shared(&shared.path, self.id, std::sync::Arc::clone(&self.sink));
            self.shared.insert(shared.path.clone(), qos);
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
    pub(super) fn leave_all_shared(&mut self) -> Vec<Filter> {
        let paths: Vec<String> = self.shared.drain().map(|(path, _)| path).collect();
        let Some(cluster) = &self.ctx.cluster else {
            return Vec::new();
        };
        for path in &paths {
            cluster.leave_shared(path, self.id);
        }
        cluster.unsubscribed(&paths);
        paths
            .iter()
            .filter_map(|path| self.routes.remove(path))
            .collect()
    }

    /// A persistent session's shared subscriptions, joined again as it resumes.
    pub(super) fn rejoin_shared(&mut self, shared: Vec<Filter>) {
        let Some(cluster) = self.ctx.cluster.clone() else {
            return;
        };
        let paths = super::routes::paths(&shared);
        for filter in shared {
            self.join_shared(&filter);
            self.routes.insert(filter.path.clone(), filter);
        }
        cluster.subscribed_soon(&paths);
    }

    /// A message of a group this connection is the chosen member of, at most at the QoS
    /// granted (gone if the client left the group meanwhile).
    pub(super) fn on_shared(&mut self, filter: &str, publish: &pb::Forward) {
        let Some(granted) = self.shared.get(filter).copied() else {
            self.ctx.im.metrics().shared_undelivered.inc();
            return;
        };
        self.write_forwarded(publish, granted);
    }

    /// A publish that came through the cluster, written to the client at most at `qos`
    /// (its MQTT 5 properties only to an MQTT 5 client).
    pub(super) fn write_forwarded(&mut self, publish: &pb::Forward, qos: u8) {
        let qos = u8::try_from(publish.qos).unwrap_or(2).min(qos);
        let properties = match self.version {
            Protocol::V5 => crate::edge::carry::strip(&publish.properties),
            Protocol::V4 => Vec::new(),
        };
        self.outbox
            .own_publish(&publish.topic, qos, &properties, &publish.payload);
    }
}
