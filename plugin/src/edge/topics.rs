//! The IM topic namespace: `{prefix}/u/{uid}` with its `digest`, `req` and `resp` children,
//! and `{prefix}/g/{gid}`.

/// What a topic name means to the hook layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// Not under the IM prefix: relayed to rumqttd.
    PassThrough,
    /// A user's inbox.
    Inbox(&'a str),
    /// A user's digest topic.
    Digest(&'a str),
    /// A user's request topic.
    Request(&'a str),
    /// A user's response topic.
    Response(&'a str),
    /// A group's topic.
    Group(&'a str),
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
    pub(crate) fn route<'a>(&self, topic: &'a str) -> Route<'a> {
        let Some(rest) = self.strip_prefix(topic) else {
            return Route::PassThrough;
        };
        let mut levels = rest.split('/');
        match (levels.next(), levels.next(), levels.next(), levels.next()) {
            (Some("u"), Some(uid), None, None) if crate::valid_uid(uid) => Route::Inbox(uid),
            (Some("g"), Some(gid), None, None) if crate::valid_uid(gid) => Route::Group(gid),
            (Some("u"), Some(uid), Some(leaf), None) if crate::valid_uid(uid) => match leaf {
                "digest" => Route::Digest(uid),
                "req" => Route::Request(uid),
                "resp" => Route::Response(uid),
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
    pub(crate) fn inbox(&self, uid: &str) -> String {
        format!("{}/u/{uid}", self.prefix)
    }

    /// `{prefix}/g/{gid}`.
    pub(crate) fn group(&self, gid: &str) -> String {
        format!("{}/g/{gid}", self.prefix)
    }

    /// `{prefix}/u/{uid}/digest`.
    pub(crate) fn digest(&self, uid: &str) -> String {
        format!("{}/u/{uid}/digest", self.prefix)
    }

    /// `{prefix}/u/{uid}/resp`.
    pub(crate) fn response(&self, uid: &str) -> String {
        format!("{}/u/{uid}/resp", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let topics = Topics::new("im");
        assert_eq!(topics.route("im/u/alice"), Route::Inbox("alice"));
        assert_eq!(topics.route("im/u/alice/req"), Route::Request("alice"));
        assert_eq!(topics.route("im/u/alice/digest"), Route::Digest("alice"));
        assert_eq!(topics.route("im/u/alice/resp"), Route::Response("alice"));
        assert_eq!(topics.route("im/u/alice/x"), Route::Unknown);
        assert_eq!(topics.route("im/g/team"), Route::Group("team"));
        assert_eq!(topics.route("im/g/team/x"), Route::Unknown);
        assert_eq!(topics.route("im/u/a:b"), Route::Unknown);
        assert_eq!(topics.route("im"), Route::Unknown);
        assert_eq!(topics.route("imx/u/alice"), Route::PassThrough);
        assert_eq!(topics.route("sensors/1"), Route::PassThrough);
    }
}
