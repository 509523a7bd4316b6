//! Who may subscribe and publish where: under the IM prefix by the IM rules, elsewhere by the
//! client's own rules and the ACL file. Pure functions.

use super::topics::{Route, Topics};
use crate::auth::acl::{self as rules, Access, AclFile, Client};
use crate::auth::Identity;
use crate::domain::{Gid, Recipient, Uid};

/// Whether a client may have `access` to a non-IM `topic` (a filter, when `subscribing`):
/// superusers may; then the provider's rules for it decide if one speaks; then the ACL
/// `file`; with neither, every non-IM topic is open, but a client that got rules of its own
/// has only what they grant.
pub(super) fn topic_allowed(
    identity: &Identity,
    client: &Client<'_>,
    topic: &str,
    access: Access,
    subscribing: bool,
    file: Option<&AclFile>,
) -> bool {
    if identity.superuser {
        return true;
    }
    let own = identity
        .acl
        .as_ref()
        .and_then(|granted| rules::decide(granted.iter(), client, topic, access, subscribing));
    match (own, file) {
        (Some(decided), _) => decided,
        (None, Some(file)) => file.allows(client, topic, access, subscribing),
        (None, None) => identity.acl.is_none(),
    }
}

/// What to do with one subscription filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterAccess {
    /// Not IM: relay to rumqttd.
    PassThrough,
    /// Inside the user's own IM tree: served by the hook layer.
    Im,
    /// A group's topic: served by the hook layer if the user is a member.
    Group(Gid),
    /// Refused.
    Denied,
}

/// Why a client without an IM identity is refused IM topics.
pub(crate) const NO_IM_IDENTITY: &str =
    "your identity is not an IM user id (1-64 letters, digits, '_', '-', '.', '@')";

/// A user may subscribe inside its own `{prefix}/u/{uid}` tree (never to `req`), and to a
/// group's exact topic (membership is checked by the caller); a client whose identity is no
/// IM uid (`None`) may not subscribe under the IM prefix at all.
pub(crate) fn subscribe(topics: &Topics, uid: Option<&Uid>, filter: &str) -> FilterAccess {
    let Some(rest) = topics.strip_prefix(filter) else {
        return FilterAccess::PassThrough;
    };
    let Some(uid) = uid else {
        return FilterAccess::Denied;
    };
    if let Route::Group(gid) = topics.route(filter) {
        return FilterAccess::Group(gid);
    }
    let mut levels = rest.split('/');
    if levels.next() != Some("u") || levels.next() != Some(uid.as_str()) {
        return FilterAccess::Denied;
    }
    let tail: Vec<&str> = levels.collect();
    match tail.as_slice() {
        [] | ["#"] | ["+"] | ["digest"] | ["resp"] => FilterAccess::Im,
        _ => FilterAccess::Denied,
    }
}

/// What a publish under the IM prefix may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishAccess {
    /// Not IM: relay to rumqttd.
    PassThrough,
    /// A chat message to a user's inbox, or to a group (membership is checked when it is
    /// accepted).
    Chat(Recipient),
    /// A request on the publisher's own `req`.
    Request,
    /// Refused, with the reason the client is told.
    Denied(&'static str),
}

/// Any user may send to any inbox; only the owner may publish on its `req`; nobody may
/// publish on `digest`, `resp` or an unknown IM topic, nor a client without an IM uid on any.
pub(crate) fn publish(topics: &Topics, uid: Option<&Uid>, topic: &str) -> PublishAccess {
    let route = topics.route(topic);
    let Some(uid) = uid else {
        return match route {
            Route::PassThrough => PublishAccess::PassThrough,
            _ => PublishAccess::Denied(NO_IM_IDENTITY),
        };
    };
    match route {
        Route::PassThrough => PublishAccess::PassThrough,
        Route::Inbox(to) => PublishAccess::Chat(Recipient::User(to)),
        Route::Group(gid) => PublishAccess::Chat(Recipient::Group(gid)),
        Route::Request(owner) if &owner == uid => PublishAccess::Request,
        Route::Request(_) => {
            PublishAccess::Denied("requests may only be published on your own req topic")
        }
        Route::Digest(_) | Route::Response(_) => {
            PublishAccess::Denied("digest and resp topics are written by the server only")
        }
        Route::Unknown => PublishAccess::Denied("not an IM topic this server serves"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(text: &str) -> Uid {
        Uid::parse(text).unwrap()
    }

    #[test]
    fn subscriptions_stay_in_the_own_tree() {
        let t = Topics::new("im");
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/alice/#"),
            FilterAccess::Im
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/alice"),
            FilterAccess::Im
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/alice/resp"),
            FilterAccess::Im
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/bob/#"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/+/#"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/#"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/g/team"),
            FilterAccess::Group(Gid::parse("team").unwrap())
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/g/+"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/g/#"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "im/u/alice/req"),
            FilterAccess::Denied
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "sensors/#"),
            FilterAccess::PassThrough
        );
        assert_eq!(
            subscribe(&t, Some(&uid("alice")), "#"),
            FilterAccess::PassThrough
        );
    }

    #[test]
    fn publishes() {
        let t = Topics::new("im");
        assert_eq!(
            publish(&t, Some(&uid("alice")), "im/u/bob"),
            PublishAccess::Chat(Recipient::User(uid("bob")))
        );
        assert_eq!(
            publish(&t, Some(&uid("alice")), "im/g/team"),
            PublishAccess::Chat(Recipient::Group(Gid::parse("team").unwrap()))
        );
        assert_eq!(
            publish(&t, Some(&uid("alice")), "im/u/alice/req"),
            PublishAccess::Request
        );
        assert!(matches!(
            publish(&t, Some(&uid("alice")), "im/u/bob/req"),
            PublishAccess::Denied(_)
        ));
        assert!(matches!(
            publish(&t, Some(&uid("alice")), "im/u/bob/resp"),
            PublishAccess::Denied(_)
        ));
        assert!(matches!(
            publish(&t, Some(&uid("alice")), "im/other"),
            PublishAccess::Denied(_)
        ));
        assert_eq!(
            publish(&t, Some(&uid("alice")), "a/b"),
            PublishAccess::PassThrough
        );
    }

    #[test]
    fn no_im_identity_keeps_out_of_im_topics() {
        let t = Topics::new("im");
        for topic in ["im/u/bob", "im/g/team", "im/u/x/req", "im/other"] {
            assert_eq!(
                publish(&t, None, topic),
                PublishAccess::Denied(NO_IM_IDENTITY)
            );
        }
        assert_eq!(publish(&t, None, "a/b"), PublishAccess::PassThrough);
        for filter in ["im/u/bob/#", "im/g/team", "im/#", "im/+/x"] {
            assert_eq!(
                subscribe(&t, None, filter),
                FilterAccess::Denied,
                "{filter}"
            );
        }
        assert_eq!(subscribe(&t, None, "#"), FilterAccess::PassThrough);
    }
}
