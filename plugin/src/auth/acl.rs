//! Topic ACLs for non-IM topics in Mosquitto's `acl_file` format, so a team's file comes in
//! unchanged:
//!
//! ```text
//! topic read public/#            # before any `user` line: anonymous clients
//! user alice
//! topic readwrite fleet/alice/#  # alice only
//! topic deny fleet/alice/secret
//! pattern write devices/%c/up    # every client: %c client id, %u username
//! ```
//!
//! As in Mosquitto, a matching `deny` wins, then any rule granting the access allows it, and
//! nothing else is allowed once a file is configured. Subscriptions must lie within a rule
//! granting `read`; each message delivered is checked again, so `deny` on part of a
//! subscribed tree holds.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use super::AuthError;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe to it / receive messages on it.
    Read,
    /// Publish to it (retained messages and wills included).
    Write,
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `readwrite` (also a rule without an access word).
    ReadWrite,
    /// `deny`: nothing, whatever other rules say.
    Deny,
}

impl Grant {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "read" => Self::Read,
            "write" => Self::Write,
            "readwrite" => Self::ReadWrite,
            "deny" => Self::Deny,
            _ => return None,
        })
    }

    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Self::ReadWrite, _) | (Self::Read, Access::Read) | (Self::Write, Access::Write)
        )
    }
}

/// One rule: its grant and topic pattern (`%u`/`%c` substituted for `pattern` rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What it grants.
    pub grant: Grant,
    /// The topic filter it covers.
    pub topic: String,
    /// Whether `%u` and `%c` in `topic` stand for the client's username and client id.
    pub pattern: bool,
}

impl Rule {
    /// The rule's topic for one client; `None` when it names a username the client lacks
    /// or substitutes a name that would change the topic's levels (`/`, `+`, `#`).
    fn topic_for(&self, username: Option<&str>, client_id: &str) -> Option<Cow<'_, str>> {
        // Checked for every publish and delivery: plain topics are borrowed, not copied.
        let needs_user = self.pattern && self.topic.contains("%u");
        let needs_client = self.pattern && self.topic.contains("%c");
        if !needs_user && !needs_client {
            return Some(Cow::Borrowed(&self.topic));
        }
        let unsafe_name = |name: &str| name.contains(['/', '+', '#']);
        let mut topic = self.topic.clone();
        if needs_user {
            let username = username.filter(|u| !unsafe_name(u))?;
            topic = topic.replace("%u", username);
        }
        if needs_client {
            if unsafe_name(client_id) {
                return None;
            }
            topic = topic.replace("%c", client_id);
        }
        Some(Cow::Owned(topic))
    }
}

/// What `rules` say about `access` to `topic` (a filter, when `subscribing`): `Some(false)`
/// when a deny covers it, `Some(true)` when a rule grants it, `None` when no rule speaks.
pub fn decide<'a>(
    rules: impl Iterator<Item = &'a Rule>,
    client: &Client<'_>,
    topic: &str,
    access: Access,
    subscribing: bool,
) -> Option<bool> {
    let covers = |pattern: &str| {
        if subscribing {
            filter_within(pattern, topic)
        } else {
            topic_matches(pattern, topic)
        }
    };
    let mut granted = false;
    for rule in rules {
        let Some(pattern) = rule.topic_for(client.username, client.client_id) else {
            continue;
        };
        if rule.grant == Grant::Deny {
            // A subscription is refused only if the deny covers all of it; single messages
            // in it are refused as they are delivered.
            if covers(&pattern) {
                return Some(false);
            }
        } else if !granted && rule.grant.allows(access) {
            granted = covers(&pattern);
        }
    }
    granted.then_some(true)
}

/// Who asks: the names `pattern` rules substitute.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The CONNECT's username (none: anonymous).
    pub username: Option<&'a str>,
    /// The client id.
    pub client_id: &'a str,
}

/// Topic rules as providers return them (a JWT claim, an auth service's answer):
/// `{"pub": [...], "sub": [...], "all": [...], "deny": [...]}` granting write, read, both,
/// or refusing; `%u` and `%c` are substituted.
pub fn rules_from_json(claim: &serde_json::Value) -> Result<Vec<Rule>, String> {
    let serde_json::Value::Object(lists) = claim else {
        return Err("ACL claim is not an object".into());
    };
    let mut rules = Vec::new();
    for (key, grant) in [
        ("deny", Grant::Deny),
        ("pub", Grant::Write),
        ("sub", Grant::Read),
        ("all", Grant::ReadWrite),
    ] {
        let Some(list) = lists.get(key) else {
            continue;
        };
        let topics = list.as_array().ok_or("ACL claim lists must be arrays")?;
        for topic in topics {
            let topic = topic.as_str().ok_or("ACL claim topics must be strings")?;
            rules.push(Rule {
                grant,
                topic: topic.to_owned(),
                pattern: true,
            });
        }
    }
    Ok(rules)
}

/// A parsed `acl_file`: rules for anonymous clients, per user, and for everyone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Parsed {
    anonymous: Vec<Rule>,
    users: std::collections::HashMap<String, Vec<Rule>>,
    everyone: Vec<Rule>,
}

impl Parsed {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parsed = Self::default();
        let mut user: Option<String> = None;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let problem = |what: &str| format!("line {}: {what}", number + 1);
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match keyword {
                "user" if !rest.is_empty() => user = Some(rest.to_owned()),
                "topic" | "pattern" => {
                    let (grant, topic) = match rest.split_once([' ', '\t']) {
                        Some((word, topic)) if Grant::parse(word).is_some() => {
                            (Grant::parse(word), topic.trim())
                        }
                        _ => (Some(Grant::ReadWrite), rest),
                    };
                    let grant = grant.ok_or_else(|| problem("unknown access"))?;
                    if topic.is_empty() || !valid_pattern(topic) {
                        return Err(problem("invalid topic"));
                    }
                    let rule = Rule {
                        grant,
                        topic: topic.to_owned(),
                        pattern: keyword == "pattern",
                    };
                    match (&user, rule.pattern) {
                        (_, true) => parsed.everyone.push(rule),
                        (Some(user), false) => {
                            parsed.users.entry(user.clone()).or_default().push(rule)
                        }
                        (None, false) => parsed.anonymous.push(rule),
                    }
                }
                _ => return Err(problem("expected `user`, `topic` or `pattern`")),
            }
        }
        Ok(parsed)
    }

    fn allows(&self, client: &Client<'_>, topic: &str, access: Access, subscribing: bool) -> bool {
        let own = match client.username {
            Some(user) => self.users.get(user).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let rules = own.iter().chain(&self.everyone);
        decide(rules, client, topic, access, subscribing).unwrap_or(false)
    }
}

/// An `acl_file`, re-read when it changes (a file that no longer parses keeps the last good
/// version).
#[derive(Debug)]
pub struct AclFile {
    path: PathBuf,
    parsed: RwLock<Arc<Parsed>>,
}

impl AclFile {
    /// Reads the file; a problem is a start-up error.
    pub fn open(path: &Path) -> Result<Self, AuthError> {
        Ok(Self {
            parsed: RwLock::new(Arc::new(read(path)?)),
            path: path.to_owned(),
        })
    }

    /// The file this ACL reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file, keeping the old rules if it no longer parses; `true` when the new
    /// rules are in use.
    pub fn reload(&self) -> bool {
        match read(&self.path) {
            Ok(parsed) => {
                *self.parsed.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(parsed);
                tracing::info!(file = %self.path.display(), "ACL file loaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "ACL file not reloaded; keeping the last good one");
                false
            }
        }
    }

    /// Whether `client` may have `access` to `topic` (a filter, when `subscribing`) under
    /// the file as it is now.
    pub fn allows(
        &self,
        client: &Client<'_>,
        topic: &str,
        access: Access,
        subscribing: bool,
    ) -> bool {
        let parsed = Arc::clone(&self.parsed.read().unwrap_or_else(PoisonError::into_inner));
        parsed.allows(client, topic, access, subscribing)
    }
}

fn read(path: &Path) -> Result<Parsed, AuthError> {
    let problem = |problem: String| AuthError::File {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    Parsed::parse(&text).map_err(problem)
}

/// A filter as MQTT allows it: `#` only last and alone in its level, `+` alone in its level.
fn valid_pattern(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i + 1 == levels.len(),
        "+" => true,
        level => !level.contains(['#', '+']),
    })
}

/// Whether `topic` matches `filter`; wildcards in the first level never match a `$` topic.
pub(crate) fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topics = topic.split('/');
    for level in filter.split('/') {
        match (level, topics.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (level, Some(t)) if level == t => {}
            _ => return false,
        }
    }
    topics.next().is_none()
}

/// Whether every topic `filter` can match is matched by `pattern`.
pub(crate) fn filter_within(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut filters = filter.split('/');
    for level in pattern.split('/') {
        match (level, filters.next()) {
            ("#", _) => return true,
            (_, Some("#")) => return false,
            ("+", Some(_)) => {}
            (level, Some(f)) if level == f && f != "+" => {}
            _ => return false,
        }
    }
    filters.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
# anonymous
topic read public/#

user alice
topic readwrite fleet/alice/#
topic deny fleet/alice/secret
topic write inbox/bob

user bob
topic fleet/bob/#

pattern write devices/%c/up
pattern read users/%u/#
";

    #[test]
    fn mosquitto_semantics() {
        let parsed = Parsed::parse(FILE).unwrap_or_default();
        let check = |user, topic, access, sub| {
            let client = Client {
                username: user,
                client_id: "dev-1",
            };
            parsed.allows(&client, topic, access, sub)
        };
        let alice = Some("alice");
        assert!(check(alice, "fleet/alice/gps", Access::Write, false));
        assert!(!check(alice, "fleet/alice/secret", Access::Read, false));
        assert!(check(alice, "fleet/alice/#", Access::Read, true));
        assert!(!check(alice, "fleet/#", Access::Read, true));
        assert!(!check(alice, "inbox/bob", Access::Read, true));
        assert!(check(alice, "inbox/bob", Access::Write, false));
        assert!(!check(alice, "public/news", Access::Read, false));
        assert!(check(alice, "devices/dev-1/up", Access::Write, false));
        assert!(!check(alice, "devices/dev-2/up", Access::Write, false));
        assert!(check(alice, "users/alice/+", Access::Read, true));
        assert!(check(Some("bob"), "fleet/bob/x", Access::Write, false));
        assert!(!check(Some("bob"), "fleet/alice/gps", Access::Read, false));
        assert!(check(None, "public/news", Access::Read, false));
        assert!(!check(None, "public/news", Access::Write, false));
        assert!(!check(None, "users/x/y", Access::Read, false));
    }

    #[test]
    fn hostile_names_never_widen_a_pattern() {
        let parsed =
            Parsed::parse("pattern readwrite devices/%c/#\npattern read u/%u").unwrap_or_default();
        let client = |username, client_id| Client {
            username: Some(username),
            client_id,
        };
        assert!(!parsed.allows(&client("a/#", "x"), "u/a/b", Access::Read, false));
        assert!(!parsed.allows(&client("x", "+"), "devices/a/up", Access::Write, false));
        assert!(!parsed.allows(&client("x", "#"), "devices/#", Access::Read, true));
        assert!(parsed.allows(&client("x", "ok"), "devices/ok/up", Access::Write, false));
    }

    #[test]
    fn matching() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("$SYS/#", "$SYS/x"));
        assert!(filter_within("a/#", "a/+/c"));
        assert!(filter_within("a/+", "a/b"));
        assert!(!filter_within("a/+", "a/#"));
        assert!(!filter_within("a/b", "a/+"));
        assert!(!filter_within("#", "$SYS/#"));
        assert!(filter_within("$SYS/#", "$SYS/#"));
        assert!(Parsed::parse("topic bogus a/b c").is_ok());
        assert!(Parsed::parse("topic a/#/b").is_err());
        assert!(Parsed::parse("allow all").is_err());
    }
}
