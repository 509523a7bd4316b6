//! The route tables: the plain-topic filters this node's clients hold (counted, so a filter
//! is advertised while anyone holds it), and those of every other node, matched against
//! each publish's topic.

use std::collections::{HashMap, HashSet};

/// This node's filters, with how many subscriptions hold each.
#[derive(Debug, Default)]
pub(super) struct LocalRoutes {
    held: HashMap<String, usize>,
}

impl LocalRoutes {
    /// Counts `filters` once more; returns those that are new to this node.
    pub(super) fn add(&mut self, filters: &[String]) -> Vec<String> {
        let mut added = Vec::new();
        for filter in filters {
            let count = self.held.entry(filter.clone()).or_default();
            *count += 1;
            if *count == 1 {
                added.push(filter.clone());
            }
        }
        added
    }

    /// Counts `filters` once less; returns those no subscription holds any more.
    pub(super) fn remove(&mut self, filters: &[String]) -> Vec<String> {
        let mut removed = Vec::new();
        for filter in filters {
            if let Some(count) = self.held.get_mut(filter) {
                *count -= 1;
                if *count == 0 {
                    self.held.remove(filter);
                    removed.push(filter.clone());
                }
            }
        }
        removed
    }

    /// How many filters are held.
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Every filter held.
    pub(super) fn all(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }
}

/// One other node's filters: exact ones looked up, wildcard ones matched, and the shared
/// subscriptions it holds members of.
#[derive(Debug, Default)]
pub(super) struct NodeRoutes {
    exact: HashSet<String>,
    wildcard: Vec<String>,
    shared: Vec<String>,
}

impl NodeRoutes {
    /// The routes of `filters`.
    pub(super) fn of(filters: impl IntoIterator<Item = String>) -> Self {
        let mut routes = Self::default();
        routes.add(filters);
        routes
    }

    /// Adds filters (once each).
    pub(super) fn add(&mut self, filters: impl IntoIterator<Item = String>) {
        for filter in filters {
            let list = if filter.starts_with("$share/") {
                &mut self.shared
            } else if filter.contains(['+', '#']) {
                &mut self.wildcard
            } else {
                self.exact.insert(filter);
                continue;
            };
            if !list.contains(&filter) {
                list.push(filter);
            }
        }
    }

    /// Removes filters.
    pub(super) fn remove(&mut self, filters: &[String]) {
        for filter in filters {
            self.exact.remove(filter);
            self.wildcard.retain(|held| held != filter);
            self.shared.retain(|held| held != filter);
        }
    }

    /// Whether a publish on `topic` reaches a subscription of this node.
    pub(super) fn matches(&self, topic: &str) -> bool {
        self.exact.contains(topic)
            || self
                .wildcard
                .iter()
                .any(|filter| rumqttd::protocol::matches(topic, filter))
    }

    /// The shared subscriptions with members there whose filter matches `topic`.
    pub(super) fn shared_matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> {
        self.shared
            .iter()
            .filter(move |shared| super::shared::matches(shared, topic))
            .map(String::as_str)
    }

    /// Whether it holds members of `shared`.
    pub(super) fn holds_shared(&self, shared: &str) -> bool {
        self.shared.iter().any(|held| held == shared)
    }

    /// How many filters.
    pub(super) fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + self.shared.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_filter_is_advertised_while_anyone_holds_it() {
        let mut routes = LocalRoutes::default();
        assert_eq!(routes.add(&strings(&["a/#", "b"])), strings(&["a/#", "b"]));
        assert!(routes.add(&strings(&["a/#"])).is_empty());
        assert!(routes.remove(&strings(&["a/#"])).is_empty());
        assert_eq!(routes.remove(&strings(&["a/#", "zz"])), strings(&["a/#"]));
        assert_eq!(routes.all(), strings(&["b"]));
    }

    #[test]
    fn topics_match_exact_and_wildcard_filters() {
        let mut node = NodeRoutes::of(strings(&["plant/+/temp", "alarms", "fleet/#"]));
        assert!(node.matches("plant/7/temp") && node.matches("alarms"));
        assert!(node.matches("fleet/a/b") && !node.matches("plant/7/humidity"));
        node.remove(&strings(&["fleet/#"]));
        assert!(!node.matches("fleet/a/b"));
        assert_eq!(node.len(), 2);
    }

    #[test]
    fn shared_subscriptions_are_not_plain_routes() {
        let node = NodeRoutes::of(strings(&["$share/w/jobs/#", "$share/v/jobs/+"]));
        assert!(!node.matches("jobs/1"));
        let matching: Vec<&str> = node.shared_matching("jobs/1").collect();
        assert_eq!(matching, vec!["$share/w/jobs/#", "$share/v/jobs/+"]);
        assert_eq!(node.shared_matching("jobs/1/x").count(), 1);
        assert!(node.holds_shared("$share/w/jobs/#"));
    }
}
