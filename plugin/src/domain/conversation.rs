//! Conversations: a 1:1 chat between two users, or a group. Parsed and formatted here and
//! nowhere else: the stores key them `dm:{a}:{b}` (the two users in order) and `g:{gid}`,
//! and a member names them `u/{peer}` and `g/{gid}`.

use std::fmt;

use super::{Gid, Uid};

/// A 1:1 chat or a group; the same value whoever of its members names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conversation(Kind);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// Two users, `lo <= hi`.
    Direct {
        lo: Uid,
        hi: Uid,
    },
    Group(Gid),
}

/// The two kinds of conversation, which may be kept for different retention periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationKind {
    /// A 1:1 chat.
    Direct,
    /// A group.
    Group,
}

impl ConversationKind {
    /// Both kinds.
    pub const ALL: [ConversationKind; 2] = [ConversationKind::Direct, ConversationKind::Group];

    /// The `kind` column of stored messages.
    pub(crate) fn code(self) -> i16 {
        match self {
            ConversationKind::Direct => 0,
            ConversationKind::Group => 1,
        }
    }
}

impl Conversation {
    /// Whether it is a 1:1 chat or a group.
    pub fn kind(&self) -> ConversationKind {
        match self.0 {
            Kind::Direct { .. } => ConversationKind::Direct,
            Kind::Group(_) => ConversationKind::Group,
        }
    }

    /// The 1:1 chat of `a` and `b`.
    pub fn direct(a: &Uid, b: &Uid) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Self(Kind::Direct {
            lo: lo.clone(),
            hi: hi.clone(),
        })
    }

    /// Group `gid`.
    pub fn group(gid: &Gid) -> Self {
        Self(Kind::Group(gid.clone()))
    }

    /// The group's id, for a group.
    pub fn gid(&self) -> Option<&Gid> {
        match &self.0 {
            Kind::Group(gid) => Some(gid),
            Kind::Direct { .. } => None,
        }
    }

    /// The two users of a 1:1 chat (a group's members are kept by the store).
    pub fn direct_members(&self) -> Option<[&Uid; 2]> {
        match &self.0 {
            Kind::Direct { lo, hi } => Some([lo, hi]),
            Kind::Group(_) => None,
        }
    }

    /// The store's key.
    pub fn key(&self) -> String {
        self.to_string()
    }

    /// From a store's key; `None` for anything this module did not write.
    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(gid) = key.strip_prefix("g:") {
            return Gid::parse(gid).ok().map(|gid| Self(Kind::Group(gid)));
        }
        let (a, b) = key.strip_prefix("dm:")?.split_once(':')?;
        Some(Self::direct(&Uid::parse(a).ok()?, &Uid::parse(b).ok()?))
    }

    /// The name member `me` uses: `u/{peer}` or `g/{gid}`.
    pub fn name_for(&self, me: &Uid) -> String {
        match &self.0 {
            Kind::Direct { lo, hi } => format!("u/{}", if lo == me { hi } else { lo }),
            Kind::Group(gid) => format!("g/{gid}"),
        }
    }

    /// The conversation `me` names `name` (`u/{peer}` or `g/{gid}`); `None` if malformed.
    pub fn from_name(name: &str, me: &Uid) -> Option<Self> {
        match name.split_once('/')? {
            ("u", peer) => Some(Self::direct(me, &Uid::parse(peer).ok()?)),
            ("g", gid) => Some(Self(Kind::Group(Gid::parse(gid).ok()?))),
            _ => None,
        }
    }
}

impl fmt::Display for Conversation {
    /// The store's key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Direct { lo, hi } => write!(f, "dm:{lo}:{hi}"),
            Kind::Group(gid) => write!(f, "g:{gid}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(text: &str) -> Uid {
        Uid::parse(text).unwrap()
    }

    #[test]
    fn keys_and_names_round_trip() {
        let (alice, bob) = (uid("alice"), uid("bob"));
        let direct = Conversation::direct(&bob, &alice);
        assert_eq!(direct, Conversation::direct(&alice, &bob));
        assert_eq!(direct.key(), "dm:alice:bob");
        assert_eq!(Conversation::from_key("dm:alice:bob"), Some(direct.clone()));
        assert_eq!(direct.name_for(&alice), "u/bob");
        assert_eq!(direct.name_for(&bob), "u/alice");
        assert_eq!(
            Conversation::from_name("u/bob", &alice),
            Some(direct.clone())
        );
        assert_eq!(direct.direct_members(), Some([&alice, &bob]));
        assert_eq!(direct.gid(), None);

        let team = Gid::parse("team").unwrap();
        let group = Conversation::group(&team);
        assert_eq!(group.key(), "g:team");
        assert_eq!(Conversation::from_key("g:team"), Some(group.clone()));
        assert_eq!(group.name_for(&alice), "g/team");
        assert_eq!(
            Conversation::from_name("g/team", &alice),
            Some(group.clone())
        );
        assert_eq!(group.gid(), Some(&team));
    }

    #[test]
    fn malformed_names_and_keys_are_refused() {
        for name in ["u/b:c", "x/bob", "u/", "g/", "bob", "u/a/b", ""] {
            assert_eq!(
                Conversation::from_name(name, &uid("alice")),
                None,
                "{name:?}"
            );
        }
        for key in ["dm:a", "dm:a:b:c", "g:", "x:a", "g:a b", ""] {
            assert_eq!(Conversation::from_key(key), None, "{key:?}");
        }
    }
}
