//! CONNECT credentials against the broker's own users table, or a verified client
//! certificate → the connection's uid.

use rumqttd::protocol::{ConnectReturnCode, Login};

use crate::config::{AuthSettings, UidSource};

/// Authenticates a CONNECT and resolves its identity (an IM uid if it is a valid one), or the
/// CONNACK code refusing it. A verified
/// client certificate's common name is the uid and needs no password; a username that names
/// someone else is refused rather than ignored.
pub(crate) fn authenticate(
    settings: &AuthSettings,
    login: Option<&Login>,
    client_id: &str,
    certified_uid: Option<&str>,
) -> Result<String, ConnectReturnCode> {
    if let Some(uid) = certified_uid {
        if login.is_some_and(|login| login.username != uid) {
            return Err(ConnectReturnCode::NotAuthorized);
        }
        return Ok(uid.to_owned());
    }
    let username = match login {
        Some(login) => {
            let known = settings.users.get(&login.username);
            if !known.is_some_and(|password| constant_time_eq(password, &login.password)) {
                return Err(ConnectReturnCode::BadUserNamePassword);
            }
            Some(login.username.as_str())
        }
        None if settings.allow_anonymous => None,
        None => return Err(ConnectReturnCode::NotAuthorized),
    };
    let uid = match (settings.uid_from, username) {
        (UidSource::Username, Some(username)) => username,
        _ => client_id,
    };
    Ok(uid.to_owned())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings {
            users: [("alice".to_string(), "pw".to_string())].into(),
            allow_anonymous: false,
            uid_from: UidSource::Username,
        }
    }

    fn login(user: &str, password: &str) -> Login {
        Login {
            username: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn users_table_decides() {
        let s = settings();
        assert_eq!(
            authenticate(&s, Some(&login("alice", "pw")), "c1", None),
            Ok("alice".into())
        );
        assert_eq!(
            authenticate(&s, Some(&login("alice", "no")), "c1", None),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(
            authenticate(&s, None, "c1", None),
            Err(ConnectReturnCode::NotAuthorized)
        );
        let mut by_client = settings();
        by_client.uid_from = UidSource::ClientId;
        assert_eq!(
            authenticate(&by_client, Some(&login("alice", "pw")), "phone-1", None),
            Ok("phone-1".into())
        );
    }

    #[test]
    fn a_certificate_names_the_uid() {
        let s = settings();
        assert_eq!(
            authenticate(&s, None, "c1", Some("dave")),
            Ok("dave".into())
        );
        assert_eq!(
            authenticate(&s, Some(&login("dave", "")), "c1", Some("dave")),
            Ok("dave".into())
        );
        assert_eq!(
            authenticate(&s, Some(&login("alice", "pw")), "c1", Some("dave")),
            Err(ConnectReturnCode::NotAuthorized)
        );
        // Not an IM uid: admitted all the same (without IM, see `Established::im`).
        assert_eq!(
            authenticate(&s, None, "c1", Some("not a uid")),
            Ok("not a uid".into())
        );
    }
}
