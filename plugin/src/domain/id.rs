//! User and group ids. They become topic levels and conversation keys, so they are
//! restricted to 1–64 characters of letters, digits, `_`, `-`, `.` and `@`; this is the one
//! place that checks it. A value of these types has been checked: nothing checks it again.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Longest id, in bytes.
const MAX_LEN: usize = 64;

/// Why a text is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {text:?}: 1-{MAX_LEN} letters, digits, '_', '-', '.' or '@'")]
pub struct InvalidId {
    /// `uid` or `gid`.
    pub what: &'static str,
    /// The text, bounded and clean (it may come from anyone).
    pub text: String,
}

fn valid(text: &str) -> bool {
    (1..=MAX_LEN).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `text`.
            ///
            /// # Errors
            /// It is not an id (see the module's rules).
            pub fn parse(text: &str) -> Result<Self, InvalidId> {
                if valid(text) {
                    Ok(Self(text.into()))
                } else {
                    Err(InvalidId {
                        what: $what,
                        text: crate::text::clean(text, 2 * MAX_LEN),
                    })
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;

            fn from_str(text: &str) -> Result<Self, InvalidId> {
                Self::parse(text)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.as_ref().to_owned()
            }
        }
    };
}

id_type!(
    /// An IM user: the identity a connection authenticated as, when it is a valid id.
    Uid,
    "uid"
);

id_type!(
    /// A group.
    Gid,
    "gid"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_once() {
        for good in ["alice", "a.b-c_d@e", &"x".repeat(64)] {
            assert_eq!(Uid::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "a/b", "a b", "a:b", "#", "é", &"x".repeat(65)] {
            assert!(Uid::parse(bad).is_err(), "{bad:?}");
        }
        let err = Gid::parse("a/b\n").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid gid \"a/b \": 1-64"),
            "{err}"
        );
        let uid = Uid::parse("bob").unwrap();
        assert!(uid == "bob" && &*uid == "bob");
        assert_eq!(format!("{uid}"), "bob");
    }
}
