//! What a subscriber gets of a publish rumqttd sends it, as MQTT says rather than as
//! rumqttd 0.20 does: at most at the QoS the publisher sent (rumqttd raises it to the
//! subscription's), not back to a publisher that subscribed with no-local, with its retain
//! flag when the subscription asked for retain-as-published, retained messages only when
//! the SUBSCRIBE's Retain Handling wanted them, and one copy for overlapping subscriptions
//! carrying every matching subscription identifier (rumqttd sends one copy per filter).
//! The publish's own facts come from what the hook layer carried across rumqttd (`carry`).

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttd::protocol::{self, Filter, RetainForwardRule};

use crate::edge::carry::Carried;
use crate::edge::cluster::shared::split as split_shared;

/// Live messages remembered per connection, to give overlapping subscriptions one copy.
const RECENT: usize = 512;

/// A plain subscription this client holds at rumqttd, with the options rumqttd ignores.
#[derive(Debug, Clone)]
pub(super) struct Subscribed {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    /// Whether the SUBSCRIBE that made or renewed it wanted the retained messages (Retain
    /// Handling 0, or 1 for a new subscription).
    wants_retained: bool,
    id: Option<usize>,
}

impl Subscribed {
    /// A subscription a SUBSCRIBE makes now; `existed` says whether the client already held
    /// the same filter.
    pub(super) fn new(filter: &Filter, id: Option<usize>, existed: bool) -> Self {
        let wants_retained = match filter.retain_forward_rule {
            RetainForwardRule::OnEverySubscribe => true,
            RetainForwardRule::OnNewSubscribe => !existed,
            RetainForwardRule::Never => false,
        };
        Self {
            qos: filter.qos as u8,
            no_local: filter.nolocal,
            retain_as_published: filter.preserve_retain,
            wants_retained,
            id,
        }
    }

    /// A subscription a persistent session resumed (retained messages came when it was
    /// made; its identifier was not kept).
    pub(super) fn resumed(filter: &Filter) -> Self {
        Self {
            wants_retained: false,
            ..Self::new(filter, None, true)
        }
    }
}

/// Ids of the live messages delivered lately, oldest first.
#[derive(Debug, Default)]
pub(super) struct Recent {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

impl Recent {
    /// Whether message `id` is new here (it is remembered from now on).
    pub(super) fn first(&mut self, id: u64) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// How one publish goes to the client.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Delivery {
    pub(super) qos: u8,
    pub(super) retain: bool,
    /// Subscription identifiers of the subscriptions it is delivered for, ascending.
    pub(super) ids: Vec<usize>,
}

/// A publish rumqttd sends at `sent_qos` on `topic`, `retained` when rumqttd sends it for a
/// SUBSCRIBE (its retain flag), as the client `me` (see `carry::publisher`) with
/// `subscriptions` gets it; `None` when it gets nothing.
pub(super) fn decide(
    subscriptions: &HashMap<String, Subscribed>,
    topic: &str,
    carried: Option<&Carried>,
    sent_qos: u8,
    retained: bool,
    me: u64,
) -> Option<Delivery> {
    let own = carried.is_some_and(|c| c.publisher == me);
    let mut matching = subscriptions
        .iter()
        .filter(|(filter, _)| {
            // A shared subscription matches by its filter.
            let inner = split_shared(filter).map_or(filter.as_str(), |(_, inner)| inner);
            protocol::matches(topic, inner)
        })
        .map(|(_, subscribed)| subscribed)
        .peekable();
    if matching.peek().is_none() {
        // Not one this connection made (a session that moved here): as rumqttd sent it.
        let qos = carried.map_or(sent_qos, |c| c.qos.min(sent_qos));
        return Some(Delivery {
            qos,
            retain: retained,
            ids: Vec::new(),
        });
    }
    let eligible: Vec<&Subscribed> = matching
        .filter(|s| match retained {
            true => s.wants_retained,
            false => !(own && s.no_local),
        })
        .collect();
    let best = eligible.iter().map(|s| s.qos).max()?;
    let published_qos = carried.map_or(sent_qos, |c| c.qos);
    let retain = retained
        || carried.is_some_and(|c| c.retain) && eligible.iter().any(|s| s.retain_as_published);
    let mut ids: Vec<usize> = eligible.iter().filter_map(|s| s.id).collect();
    ids.sort_unstable();
    ids.dedup();
    Some(Delivery {
        qos: published_qos.min(best),
        retain,
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn filter(path: &str, qos: QoS, no_local: bool, rap: bool, rule: RetainForwardRule) -> Filter {
        Filter {
            path: path.into(),
            qos,
            nolocal: no_local,
            preserve_retain: rap,
            retain_forward_rule: rule,
        }
    }

    #[test]
    fn qos_is_the_lower_of_publish_and_subscription_and_overlaps_join() {
        let every = || RetainForwardRule::OnEverySubscribe;
        let mut subs = HashMap::new();
        let a = filter("a/b", QoS::ExactlyOnce, false, false, every());
        subs.insert("a/b".to_string(), Subscribed::new(&a, Some(2), false));
        let hash = filter("a/#", QoS::AtMostOnce, false, true, every());
        subs.insert("a/#".to_string(), Subscribed::new(&hash, Some(3), false));
        let carried = Carried::new(1, true, 7);
        let delivery = decide(&subs, "a/b", Some(&carried), 2, false, 9);
        let expected = Delivery {
            qos: 1,
            retain: true,
            ids: vec![2, 3],
        };
        assert_eq!(delivery, Some(expected));
    }

    #[test]
    fn no_local_and_retain_handling_keep_copies_away() {
        let mut subs = HashMap::new();
        let local = filter("t", QoS::AtLeastOnce, true, false, RetainForwardRule::Never);
        subs.insert("t".to_string(), Subscribed::new(&local, None, false));
        let own = Carried::new(1, false, 9);
        assert_eq!(decide(&subs, "t", Some(&own), 1, false, 9), None);
        assert!(decide(&subs, "t", Some(&own), 1, false, 10).is_some());
        assert_eq!(decide(&subs, "t", Some(&own), 1, true, 10), None);
        let mut recent = Recent::default();
        assert!(recent.first(1) && !recent.first(1));
    }
}
