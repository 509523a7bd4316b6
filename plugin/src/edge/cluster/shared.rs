//! Shared subscriptions as one group across nodes. In a cluster the hook layer holds
//! `$share/{group}/{filter}` itself, not rumqttd: each node advertises the groups its clients
//! are members of as routes, and the node where a message is published picks one node of
//! the group in turn (its own or another), which hands it to one of its members in turn. A
//! member whose queue is full is skipped for the next.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::edge::sink::ConnectionSink;
use crate::wire::pb;

/// `$share/{group}/{filter}` split into its group and filter; `None` if it is not a well-formed
/// shared subscription.
pub(crate) fn split(shared: &str) -> Option<(&str, &str)> {
    let rest = shared.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    let group_ok = !group.is_empty() && !group.contains(['+', '#']);
    (group_ok && !filter.is_empty()).then_some((group, filter))
}

/// Whether `shared`'s filter matches `topic`.
pub(super) fn matches(shared: &str, topic: &str) -> bool {
    split(shared).is_some_and(|(_, filter)| rumqttd::protocol::matches(topic, filter))
}

/// One group's members on this node.
#[derive(Debug, Default)]
struct Members {
    sessions: Vec<(u64, Arc<ConnectionSink>)>,
    /// The member the next message goes to first.
    next: usize,
}

/// This node's members of shared subscriptions, by the whole `$share/...` filter.
#[derive(Debug, Default)]
pub(super) struct LocalMembers {
    groups: RwLock<HashMap<Arc<str>, Members>>,
}

impl LocalMembers {
    /// Session `session` (reached through `sink`) is now a member of `shared`.
    pub(super) fn join(&self, shared: &str, session: u64, sink: Arc<ConnectionSink>) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let members = groups.entry(shared.into()).or_default();
        if !members.sessions.iter().any(|(id, _)| *id == session) {
            members.sessions.push((session, sink));
        }
    }

    /// Session `session` is no longer a member of `shared`.
    pub(super) fn leave(&self, shared: &str, session: u64) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(members) = groups.get_mut(shared) {
            members.sessions.retain(|(id, _)| *id != session);
            if members.sessions.is_empty() {
                groups.remove(shared);
            }
        }
    }

    /// Whether a session of this node is a member of `shared`.
    pub(super) fn holds(&self, shared: &str) -> bool {
        self.groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(shared)
    }

    /// The shared subscriptions with a member here whose filter matches `topic`.
    pub(super) fn matching(&self, topic: &str) -> Vec<Arc<str>> {
        self.groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|shared| matches(shared, topic))
            .cloned()
            .collect()
    }

    /// Hands `publish` to one member of `shared`, in turn; `false` if none took it.
    pub(super) fn deliver(&self, shared: &str, publish: &Arc<pb::Forward>) -> bool {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let Some(members) = groups.get_mut(shared) else {
            return false;
        };
        let (filter, count) = (Arc::<str>::from(shared), members.sessions.len());
        for attempt in 0..count {
            let index = (members.next + attempt) % count;
            if members.sessions[index].1.shared(&filter, publish) {
                members.next = (index + 1) % count;
                return true;
            }
        }
        false
    }
}

/// Where each shared subscription matching a publish goes next: the nodes holding members
/// of it, taken in turn per subscription.
#[derive(Debug, Default)]
pub(super) struct Rotation {
    next: std::sync::Mutex<HashMap<String, usize>>,
}

impl Rotation {
    /// Picks one of `nodes` (never empty) for `shared`, the next in turn.
    pub(super) fn pick<'a, T>(&self, shared: &str, nodes: &'a [T]) -> &'a T {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let turn = next.entry(shared.to_owned()).or_default();
        let picked = &nodes[*turn % nodes.len()];
        *turn = turn.wrapping_add(1);
        picked
    }

    /// Forgets the turns of shared subscriptions no node holds any more.
    pub(super) fn keep_only(&self, held: impl Fn(&str) -> bool) {
        self.next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|shared, _| held(shared));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        assert_eq!(split("$share/workers/jobs/#"), Some(("workers", "jobs/#")));
        assert_eq!(split("$share/g/a"), Some(("g", "a")));
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/+/a",
            "a/b",
        ] {
            assert_eq!(split(bad), None, "{bad}");
        }
        assert!(matches("$share/w/jobs/+", "jobs/7"));
        assert!(!matches("$share/w/jobs/+", "jobs/7/x"));
    }

    #[test]
    fn turns_go_round_per_subscription() {
        let rotation = Rotation::default();
        let nodes = ["a", "b", "c"];
        let picked: Vec<&str> = (0..4)
            .map(|_| *rotation.pick("$share/g/x", &nodes))
            .collect();
        assert_eq!(picked, vec!["a", "b", "c", "a"]);
        assert_eq!(*rotation.pick("$share/h/x", &nodes), "a");
        rotation.keep_only(|shared| shared == "$share/h/x");
        assert_eq!(*rotation.pick("$share/g/x", &nodes), "a");
    }
}
