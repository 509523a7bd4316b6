//! The IM topic namespace: `{prefix}/u/{uid}` with its `digest`, `req` and `resp` children,
//! and `{prefix}/g/{gid}`. Topics are where ids enter from the network: they are parsed
//! here, into the typed ids the rest of the hook layer uses.

use crate::domain::{Gid, Uid};

/// What a topic name means to the hook layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Not under the IM prefix: relayed to rumqttd.
    PassThrough,
    /// A user's inbox.
    Inbox(Uid),
    /// A user's digest topic.
    Digest(Uid),
    /// A user's request topic.
    Request(Uid),
    /// A user's response topic.
    Response(Uid),
    /// A group's topic.
    Group(Gid),
    /// Under the IM prefix but not a topic the plugin serves.
    Unknown,
}

/// Formats and parses IM topics for one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    prefix: String,
}

impl Topics {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Classifies a topic name.
    pub(crate) fn route(&self, topic: &str) -> Route {
        let Some(rest) = self.strip_prefix(topic) else {
            return Route::PassThrough;
        };
        let mut levels = rest.split('/');
        let levels = (levels.next(), levels.next(), levels.next(), levels.next());
        let (kind, id, leaf) = match levels {
            (Some(kind), Some(id), leaf, None) => (kind, id, leaf),
            _ => return Route::Unknown,
        };
        match (kind, leaf) {
            ("g", None) => Gid::parse(id).map_or(Route::Unknown, Route::Group),
            ("u", leaf) => match (Uid::parse(id), leaf) {
                (Ok(uid), None) => Route::Inbox(uid),
                (Ok(uid), Some("digest")) => Route::Digest(uid),
                (Ok(uid), Some("req")) => Route::Request(uid),
                (Ok(uid), Some("resp")) => Route::Response(uid),
                _ => Route::Unknown,
            },
            _ => Route::Unknown,
        }
    }

    /// `Some(rest)` when `topic` (name or filter) lies under the IM prefix; filters starting
    /// with a wildcard never match it in rumqttd because IM topics never enter its router.
    pub(crate) fn strip_prefix<'a>(&self, topic: &'a str) -> Option<&'a str> {
        match topic.strip_prefix(self.prefix.as_str()) {
            Some("") => Some(""),
            Some(rest) => rest.strip_prefix('/'),
            None => None,
        }
    }

    /// `{prefix}/u/{uid}`.
    pub(crate) fn inbox(&self, uid: &Uid) -> String {
        format!("{}/u/{uid}", self.prefix)
    }

    /// `{prefix}/g/{gid}`.
    pub(crate) fn group(&self, gid: &Gid) -> String {
        format!("{}/g/{gid}", self.prefix)
    }

    /// `{prefix}/u/{uid}/digest`.
    pub(crate) fn digest(&self, uid: &Uid) -> String {
        format!("{}/u/{uid}/digest", self.prefix)
    }

    /// `{prefix}/u/{uid}/resp`.
    pub(crate) fn response(&self, uid: &Uid) -> String {
        format!("{}/u/{uid}/resp", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let topics = Topics::new("im");
        let alice = Uid::parse("alice").unwrap();
        assert_eq!(topics.route("im/u/alice"), Route::Inbox(alice.clone()));
        assert_eq!(
            topics.route("im/u/alice/req"),
            Route::Request(alice.clone())
        );
        assert_eq!(
            topics.route("im/u/alice/digest"),
            Route::Digest(alice.clone())
        );
        assert_eq!(topics.route("im/u/alice/resp"), Route::Response(alice));
        assert_eq!(topics.route("im/u/alice/x"), Route::Unknown);
        let team = Gid::parse("team").unwrap();
        assert_eq!(topics.route("im/g/team"), Route::Group(team));
        assert_eq!(topics.route("im/g/team/x"), Route::Unknown);
        assert_eq!(topics.route("im/u/a:b"), Route::Unknown);
        assert_eq!(topics.route("im"), Route::Unknown);
        assert_eq!(topics.route("imx/u/alice"), Route::PassThrough);
        assert_eq!(topics.route("sensors/1"), Route::PassThrough);
    }
}
