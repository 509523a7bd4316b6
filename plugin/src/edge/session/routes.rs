//! The plain-topic filters this client holds, as routes of the cluster: other nodes forward
//! matching publishes here while anyone holds one (a persistent session keeps them while it
//! waits at rumqttd), and the client's own publishes go to the nodes whose clients want
//! them. Shared subscriptions are routes too (see `shared`).

use rumqttd::protocol::Filter;

use super::outcome::Outcome;
use super::Session;
use crate::edge::codec::PublishView;
use crate::edge::{EdgeError, KeptRoutes};

impl Session {
    /// `held` filters of a SUBSCRIBE took effect (at rumqttd, or shared subscriptions
    /// here): they become routes, and when some are new to this node the SUBACK waits until
    /// the other nodes were told, so a publish anywhere that follows the SUBACK reaches the
    /// client.
    pub(super) fn answer_subscribe(
        &mut self,
        pkid: u16,
        codes: Vec<u8>,
        held: Vec<Filter>,
    ) -> Result<(), EdgeError> {
        let fresh: Vec<String> = held
            .into_iter()
            .filter_map(|filter| {
                let path = filter.path.clone();
                self.routes
                    .insert(path.clone(), filter)
                    .is_none()
                    .then_some(path)
            })
            .collect();
        let change = match &self.ctx.cluster {
            Some(cluster) if !fresh.is_empty() => cluster.subscribed(&fresh),
            _ => None,
        };
        match (change, self.ctx.cluster.clone()) {
            (Some(change), Some(cluster)) => {
                self.start(async move {
                    cluster.advertise(&change).await;
                    Outcome::Advertised { pkid, codes }
                });
                Ok(())
            }
            _ => self.write_suback(pkid, codes),
        }
    }

    /// The client no longer holds `filters`.
    pub(super) fn release_routes(&mut self, filters: &[String]) {
        let released: Vec<String> = filters
            .iter()
            .filter(|filter| self.routes.remove(*filter).is_some())
            .cloned()
            .collect();
        if let (Some(cluster), false) = (&self.ctx.cluster, released.is_empty()) {
            cluster.unsubscribed(&released);
        }
    }

    /// The routes a connection ending leaves: a persistent session keeps them for the
    /// client's next connection (its shared subscriptions are left meanwhile); otherwise
    /// rumqttd drops its subscriptions, and so do they.
    pub(super) fn leave_routes(&mut self) {
        let shared = self.leave_all_shared();
        let plain: Vec<Filter> = self.routes.drain().map(|(_, filter)| filter).collect();
        if !self.lifetime.persists() {
            if let Some(cluster) = &self.ctx.cluster {
                cluster.unsubscribed(&paths(&plain));
            }
        } else if !plain.is_empty() || !shared.is_empty() {
            self.ctx
                .keep_routes(&self.client_id, KeptRoutes { plain, shared });
        }
    }

    /// At CONNECT: the routes a persistent session left become this connection's (rumqttd
    /// resumes its subscriptions, and the shared ones are joined again), or are withdrawn
    /// with it (a clean session discards them).
    pub(super) fn take_kept_routes(&mut self) {
        let KeptRoutes { plain, shared } = self.ctx.take_routes(&self.client_id);
        if self.clean_start {
            if let Some(cluster) = &self.ctx.cluster {
                cluster.unsubscribed(&paths(&plain));
            }
            return;
        }
        self.hold_resumed(plain);
        self.rejoin_shared(shared);
    }

    /// Plain subscriptions a session brought along, in place at rumqttd already.
    pub(super) fn hold_resumed(&mut self, plain: Vec<Filter>) {
        for filter in plain {
            let resumed = super::deliver::Subscribed::resumed(&filter);
            self.subscriptions.insert(filter.path.clone(), resumed);
            self.routes.insert(filter.path.clone(), filter);
        }
    }

    /// A client's publish that went to this node's rumqttd goes to the other nodes whose
    /// clients want it too (and to shared subscriptions); a QoS 2 publish the client
    /// retransmits before PUBREL is not forwarded twice.
    pub(super) fn forward_elsewhere(&mut self, publish: &PublishView) {
        let Some(cluster) = &self.ctx.cluster else {
            return;
        };
        if publish.qos() == 2 && !self.forwarded_qos2.insert(publish.pkid) {
            return;
        }
        cluster.forward(publish);
    }
}

/// The paths of `filters`.
pub(super) fn paths(filters: &[Filter]) -> Vec<String> {
    filters.iter().map(|filter| filter.path.clone()).collect()
}
