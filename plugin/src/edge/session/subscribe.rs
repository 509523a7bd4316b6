//! SUBSCRIBE and UNSUBSCRIBE. What a filter alone decides (validity, the topic ACL, IM
//! routes) is decided as the packet arrives; what needs a script or the store (the policy's
//! `on_subscribe`, group membership) is checked in the connection's ordered operations, so
//! the connection keeps reading meanwhile, and every answer and subscription takes effect
//! in arrival order with the connection's publishes.

use std::sync::Arc;

use rumqttd::protocol::{
    self, Filter, Packet, QoS, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};

use super::deliver::Subscribed;
use super::outcome::{Granted, Outcome, PendingAck, Subscription};
use super::{recorded, Session};
use crate::auth::acl::Access;
use crate::auth::AclSubscribe;
use crate::domain::{Gid, Uid};
use crate::edge::acl::{self, FilterAccess};
use crate::edge::cluster::shared::split as split_shared;
use crate::edge::codec::{self, Protocol};
use crate::edge::topics::{Route, Topics};
use crate::edge::EdgeError;
use crate::hook::{self, Hooks, Verdict};
use crate::im::ImService;

/// SUBACK code for a refused filter (0x87 in MQTT 5, 0x80 in 3.1.1).
const NOT_AUTHORIZED: u8 = 0x87;
/// SUBACK code for a filter that is not a valid one (or one rumqttd cannot take).
const FILTER_INVALID: u8 = 0x8f;
/// UNSUBACK code for a filter the client had not subscribed to.
const NO_SUBSCRIPTION: u8 = 0x11;

/// What is still to check about one filter.
enum Check {
    Decided(Granted),
    /// The hooks' `subscribe`, then rumqttd.
    Hooks(Filter, hook::Subscription),
    /// Membership of the group.
    Member {
        filter: String,
        qos: u8,
        gid: Gid,
    },
}

impl Session {
    /// Decides what each filter alone decides and queues the rest of the checks.
    pub(super) fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
    ) {
        let checks = subscribe
            .filters
            .into_iter()
            .map(|filter| self.check_filter(filter))
            .collect();
        self.queue_subscription(Some(subscribe.pkid), properties, checks);
    }

    /// A resumed persistent session's IM filters: groups are checked again (the device may
    /// have left one meanwhile), then presence and a fresh digest follow.
    pub(super) fn resume_subscriptions(&mut self) {
        let filters = std::mem::take(&mut self.im_filters);
        let checks = filters
            .into_iter()
            .map(|(filter, qos)| match self.ctx.topics.route(&filter) {
                Route::Group(gid) => Check::Member { gid, filter, qos },
                _ => Check::Decided(Granted::Im { filter, qos }),
            })
            .collect();
        self.queue_subscription(None, None, checks);
    }

    fn check_filter(&self, filter: Filter) -> Check {
        let shared = filter.path.starts_with("$share/");
        // rumqttd 0.20 ends the whole link on a `$` filter other than `$share/...`.
        let dollar = filter.path.starts_with('$') && !shared;
        // A shared subscription is checked by its filter, which must be a plain one.
        let checked = match split_shared(&filter.path) {
            Some((_, inner)) => inner,
            None if shared => return Check::Decided(Granted::Refused(FILTER_INVALID)),
            None => &filter.path,
        };
        if !protocol::valid_filter(checked) || dollar {
            return Check::Decided(Granted::Refused(FILTER_INVALID));
        }
        let qos = (filter.qos as u8).min(1);
        match acl::subscribe(&self.ctx.topics, self.im_uid(), checked) {
            FilterAccess::PassThrough if self.acl_refuses_subscription(checked) => {
                tracing::debug!(filter = filter.path, "subscribe denied by the ACL");
                Check::Decided(Granted::Refused(NOT_AUTHORIZED))
            }
            FilterAccess::PassThrough => {
                let subscription = hook::Subscription {
                    filter: filter.path.clone(),
                    qos: filter.qos as u8,
                };
                Check::Hooks(filter, subscription)
            }
            _ if shared => {
                tracing::debug!(
                    filter = filter.path,
                    "shared subscription of IM topics denied"
                );
                Check::Decided(Granted::Refused(NOT_AUTHORIZED))
            }
            FilterAccess::Im => Check::Decided(Granted::Im {
                filter: filter.path,
                qos,
            }),
            FilterAccess::Group(gid) => Check::Member {
                gid,
                filter: filter.path,
                qos,
            },
            FilterAccess::Denied => {
                tracing::debug!(filter = filter.path, "subscribe denied");
                Check::Decided(Granted::Refused(NOT_AUTHORIZED))
            }
        }
    }

    /// Whether the topic ACL refuses a SUBSCRIBE to `filter` it does not wholly grant: not
    /// under `auth.acl_subscribe = "filter"` (each delivery is checked instead), nor by
    /// default under an `acl_file`, as with Mosquitto; by default under rules the client's
    /// identity brought, as with EMQX.
    fn acl_refuses_subscription(&self, filter: &str) -> bool {
        let refuse = match self.ctx.auth.acl_subscribe() {
            Some(AclSubscribe::Refuse) => true,
            Some(AclSubscribe::Filter) => false,
            None => self.identity.acl.is_some(),
        };
        refuse && !self.acl_allows(filter, Access::Read, true, "subscribe")
    }

    fn queue_subscription(
        &mut self,
        pkid: Option<u16>,
        properties: Option<SubscribeProperties>,
        checks: Vec<Check>,
    ) {
        let (hooks, im) = (self.ctx.hooks.clone(), self.ctx.im.clone());
        let client = Arc::clone(&self.client);
        let member = self.im_uid().cloned();
        self.start(async move {
            let mut granted = Vec::with_capacity(checks.len());
            for check in checks {
                granted.push(settle(check, &hooks, &client, member.as_ref(), &im).await);
            }
            Outcome::Subscribed(Subscription {
                pkid,
                properties,
                granted,
            })
        });
    }

    /// Takes a checked SUBSCRIBE into effect: IM filters here, the rest to rumqttd, whose
    /// SUBACK completes the answer.
    pub(super) fn subscribed(&mut self, subscription: Subscription) -> Result<(), EdgeError> {
        let Subscription {
            pkid,
            properties,
            granted,
        } = subscription;
        let mut codes = Vec::with_capacity(granted.len());
        let mut relayed = Vec::new();
        let mut joined = Vec::new();
        for grant in granted {
            codes.push(match grant {
                Granted::Refused(code) => Some(code),
                Granted::Im { filter, qos } => {
                    self.im_filters.insert(filter, qos);
                    Some(qos)
                }
                Granted::Group { filter, qos, gid } => {
                    if let Some(device) = &self.im {
                        let sink = Arc::clone(&self.sink);
                        self.ctx.im.watch_group(&gid, device, self.id, sink);
                        self.im_filters.insert(filter, qos);
                    }
                    Some(qos)
                }
                Granted::Relay(filter) if self.shared_here(&filter.path) => {
                    let qos = self.join_shared(&filter);
                    joined.push(filter);
                    Some(qos)
                }
                Granted::Relay(filter) => {
                    let id = properties.as_ref().and_then(|p| p.id);
                    let existed = self.subscriptions.contains_key(&filter.path);
                    let subscribed = Subscribed::new(&filter, id, existed);
                    self.subscriptions.insert(filter.path.clone(), subscribed);
                    relayed.push(filter);
                    None
                }
            });
        }
        let Some(pkid) = pkid else {
            self.after_subscribe();
            return Ok(());
        };
        if relayed.is_empty() {
            return self.answer_subscribe(pkid, codes.into_iter().flatten().collect(), joined);
        }
        let pending = PendingAck {
            codes,
            relayed: relayed.clone(),
            joined,
        };
        let subscribe = Subscribe {
            pkid,
            filters: relayed,
        };
        self.ask_rumqttd(pkid, pending, Packet::Subscribe(subscribe, properties))
    }

    /// Sends rumqttd its part of a SUBSCRIBE or UNSUBSCRIBE; the answer to the client waits
    /// for rumqttd's codes, which fill the `None`s of `codes` (see `Connection::merge`).
    fn ask_rumqttd(
        &mut self,
        pkid: u16,
        pending: PendingAck,
        packet: Packet,
    ) -> Result<(), EdgeError> {
        self.pending.insert(pkid, pending);
        codec::write_packet(self.rumqttd_out(), Protocol::V5, packet)?;
        Ok(())
    }

    pub(super) fn write_suback(&mut self, pkid: u16, codes: Vec<u8>) -> Result<(), EdgeError> {
        let return_codes = codes
            .into_iter()
            .map(|code| match (code, self.version) {
                (0, _) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                (1, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                (2, _) => SubscribeReasonCode::Success(QoS::ExactlyOnce),
                (_, Protocol::V4) => SubscribeReasonCode::Failure,
                (NOT_AUTHORIZED, Protocol::V5) => SubscribeReasonCode::NotAuthorized,
                (FILTER_INVALID, Protocol::V5) => SubscribeReasonCode::TopicFilterInvalid,
                (_, Protocol::V5) => SubscribeReasonCode::Unspecified,
            })
            .collect();
        let suback = SubAck { pkid, return_codes };
        self.outbox.write_packet(Packet::SubAck(suback, None))?;
        self.after_subscribe();
        Ok(())
    }

    /// Presence and the once-per-connection digest follow the SUBACK.
    pub(super) fn after_subscribe(&mut self) {
        let Some(device) = self.im.clone() else {
            return;
        };
        let inbox = self.ctx.topics.inbox(&device.uid);
        if self.granted_qos(&inbox).is_some() {
            self.go_online();
        }
        let digest = self.ctx.topics.digest(&device.uid);
        if !self.digest_sent && self.granted_qos(&digest).is_some() {
            self.digest_sent = true;
            let im = self.ctx.im.clone();
            let registration = self.registration.clone();
            let budget = self.outbox.payload_budget(&digest, 0);
            self.start(async move {
                if !recorded(registration).await {
                    if let Err(e) = im.connected(&device).await {
                        return Outcome::Digest(Err(e));
                    }
                }
                Outcome::Digest(im.digest(&device, budget).await)
            });
        }
    }

    /// Queued behind the connection's earlier operations (a SUBSCRIBE still being checked
    /// must take effect before an UNSUBSCRIBE that follows it).
    pub(super) fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
    ) {
        let ready = Outcome::Unsubscribed(unsubscribe, properties);
        self.start(std::future::ready(ready));
    }

    /// Takes an UNSUBSCRIBE into effect: IM filters here, the rest at rumqttd, whose
    /// UNSUBACK completes the answer.
    pub(super) fn unsubscribed(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
    ) -> Result<(), EdgeError> {
        let mut codes = Vec::with_capacity(unsubscribe.filters.len());
        let mut relayed = Vec::new();
        for filter in unsubscribe.filters {
            if self.ctx.topics.strip_prefix(&filter).is_some() {
                if let Route::Group(gid) = self.ctx.topics.route(&filter) {
                    self.ctx.im.unwatch_group(&gid, self.id);
                }
                let existed = self.im_filters.remove(&filter).is_some();
                codes.push(Some(if existed { 0 } else { NO_SUBSCRIPTION }));
            } else if self.shared_here(&filter) {
                let existed = self.leave_shared(&filter);
                codes.push(Some(if existed { 0 } else { NO_SUBSCRIPTION }));
            } else if self.linked && self.holds_at_rumqttd(&filter) {
                codes.push(None);
                relayed.push(filter);
            } else {
                // Not held at rumqttd (which never answers an UNSUBSCRIBE of a filter it
                // does not hold for the link).
                codes.push(Some(NO_SUBSCRIPTION));
            }
        }
        let subscribed = self.own_topic(Topics::inbox);
        if subscribed.is_some_and(|inbox| self.granted_qos(&inbox).is_none()) {
            self.go_offline();
        }
        let pkid = unsubscribe.pkid;
        if relayed.is_empty() {
            return self.write_unsuback(pkid, codes.into_iter().flatten().collect());
        }
        let pending = PendingAck {
            codes,
            relayed: relayed.iter().map(|path| path_only(path)).collect(),
            joined: Vec::new(),
        };
        let unsubscribe = Unsubscribe {
            pkid,
            filters: relayed,
        };
        self.ask_rumqttd(pkid, pending, Packet::Unsubscribe(unsubscribe, properties))
    }

    /// Whether rumqttd holds `filter` for this client (forgotten here as it is asked to
    /// drop it).
    fn holds_at_rumqttd(&mut self, filter: &str) -> bool {
        let subscribed = self.subscriptions.remove(filter).is_some();
        subscribed || self.routes.contains_key(filter)
    }

    pub(super) fn write_unsuback(&mut self, pkid: u16, codes: Vec<u8>) -> Result<(), EdgeError> {
        let reasons = codes
            .into_iter()
            .map(|code| match code {
                0 => UnsubAckReason::Success,
                _ => UnsubAckReason::NoSubscriptionExisted,
            })
            .collect();
        let unsuback = UnsubAck { pkid, reasons };
        self.outbox.write_packet(Packet::UnsubAck(unsuback, None))?;
        Ok(())
    }

    /// The groups this connection's filters name.
    pub(super) fn group_filters(&self) -> Vec<(String, Gid)> {
        self.im_filters
            .keys()
            .filter_map(|filter| match self.ctx.topics.route(filter) {
                Route::Group(gid) => Some((filter.clone(), gid)),
                _ => None,
            })
            .collect()
    }
}

/// An UNSUBSCRIBE's filter (only the path matters).
fn path_only(path: &str) -> Filter {
    Filter {
        path: path.to_owned(),
        qos: QoS::AtMostOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: protocol::RetainForwardRule::OnEverySubscribe,
    }
}

/// Runs what is left to check of one filter.
async fn settle(
    check: Check,
    hooks: &Hooks,
    client: &hook::Client,
    member: Option<&Uid>,
    im: &ImService,
) -> Granted {
    match check {
        Check::Decided(granted) => granted,
        Check::Hooks(filter, subscription) => match hooks.subscribe(client, &subscription).await {
            Verdict::Deny(reason) => {
                let reason = crate::text::LoggedId(&reason);
                tracing::debug!(filter = filter.path, %reason, "subscribe denied by a hook");
                Granted::Refused(NOT_AUTHORIZED)
            }
            Verdict::Allow | Verdict::Rewrite(_) => Granted::Relay(filter),
        },
        Check::Member { filter, qos, gid } => {
            let Some(uid) = member else {
                return Granted::Refused(NOT_AUTHORIZED);
            };
            match im.group_role(uid, &gid).await {
                Ok(Some(_)) => Granted::Group { filter, qos, gid },
                Ok(None) => {
                    tracing::debug!(%gid, "group subscribe by a non-member denied");
                    Granted::Refused(NOT_AUTHORIZED)
                }
                Err(e) => {
                    tracing::warn!(%gid, error = %e, "group membership not checkable; subscribe refused");
                    Granted::Refused(NOT_AUTHORIZED)
                }
            }
        }
    }
}
