//! What a `PusherSet` must be before it is stored: every field bounded and clean, the URL
//! one the operator allowed, content only where the operator allows it.

use super::settings::Settings;
use crate::store::{Device, Pusher};
use crate::wire::pb;

const MAX_APP_ID: usize = 64;
const MAX_PUSHKEY: usize = 512;
const MAX_LANG: usize = 16;
const MAX_DATA: usize = 1024;

/// Why a pusher was refused, said to the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PusherError {
    /// The server has no gateway configured.
    #[error("push is off on this server")]
    Off,
    /// A field is malformed.
    #[error("{0}")]
    Invalid(&'static str),
    /// The URL is not one of the server's gateways.
    #[error("url is not a push gateway of this server")]
    UnknownGateway,
    /// Content was asked for where the operator keeps it in.
    #[error("format \"full\" is off on this server: use \"event_id_only\"")]
    ContentOff,
}

/// The pusher `set` describes for `device`, or why it cannot be one.
pub(crate) fn validate(
    settings: &Settings,
    device: &Device,
    set: pb::PusherSet,
    now_ms: i64,
) -> Result<Pusher, PusherError> {
    if settings.allowed_urls.is_empty() {
        return Err(PusherError::Off);
    }
    let printable = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
    if set.app_id.is_empty() || set.app_id.len() > MAX_APP_ID || !printable(&set.app_id) {
        return Err(PusherError::Invalid(
            "app_id must be 1 to 64 printable ASCII characters",
        ));
    }
    if set.pushkey.is_empty()
        || set.pushkey.len() > MAX_PUSHKEY
        || set.pushkey.chars().any(char::is_control)
    {
        return Err(PusherError::Invalid(
            "pushkey must be 1 to 512 bytes without control characters",
        ));
    }
    if !settings.allowed_urls.contains(&set.url) {
        return Err(PusherError::UnknownGateway);
    }
    let format = match set.format.as_str() {
        "" | "event_id_only" => "event_id_only",
        "full" if settings.allow_content => "full",
        "full" => return Err(PusherError::ContentOff),
        _ => {
            return Err(PusherError::Invalid(
                "format must be \"event_id_only\" or \"full\"",
            ))
        }
    };
    let language = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if set.lang.len() > MAX_LANG || !set.lang.bytes().all(language) {
        return Err(PusherError::Invalid(
            "lang must be at most 16 letters, digits, '-' or '_'",
        ));
    }
    let data_json = match set.data_json.as_str() {
        "" => "{}".to_owned(),
        text if text.len() > MAX_DATA => {
            return Err(PusherError::Invalid("data_json must be at most 1024 bytes"))
        }
        text => match serde_json::from_str::<serde_json::Value>(text) {
            // Stored as re-serialised: compact, and nothing but JSON.
            Ok(object @ serde_json::Value::Object(_)) => object.to_string(),
            _ => return Err(PusherError::Invalid("data_json must be a JSON object")),
        },
    };
    // Re-serialising can grow it (`1e2` is written `100.0`): the bound holds for what is kept.
    if data_json.len() > MAX_DATA {
        return Err(PusherError::Invalid("data_json must be at most 1024 bytes"));
    }
    Ok(Pusher {
        device: device.clone(),
        app_id: set.app_id,
        pushkey: set.pushkey,
        url: set.url,
        format: format.to_owned(),
        lang: set.lang,
        data_json,
        created_ms: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::uid;

    const GATEWAY: &str = "http://gateway:5000/_matrix/push/v1/notify";

    fn settings(allow_content: bool) -> Settings {
        Settings {
            allowed_urls: vec![GATEWAY.into()],
            allow_content,
            max_pushers_per_device: 5,
            delay: crate::settings::Period::millis(2000),
            coalesce: crate::settings::Period::millis(30_000),
            timeout: crate::settings::Period::millis(5000),
            max_pending: 100,
        }
    }

    fn phone() -> Device {
        Device {
            uid: uid("alice"),
            client_id: "phone".into(),
        }
    }

    fn set() -> pb::PusherSet {
        pb::PusherSet {
            app_id: "com.example.chat".into(),
            pushkey: "token-1".into(),
            url: GATEWAY.into(),
            ..pb::PusherSet::default()
        }
    }

    #[test]
    fn a_plain_pusher_is_content_free_with_empty_data() {
        let pusher = validate(&settings(false), &phone(), set(), 7).unwrap();
        assert_eq!(
            (
                pusher.format.as_str(),
                pusher.data_json.as_str(),
                pusher.created_ms
            ),
            ("event_id_only", "{}", 7)
        );
    }

    #[test]
    fn every_field_is_checked() {
        let refused = |change: fn(&mut pb::PusherSet)| {
            let mut asked = set();
            change(&mut asked);
            validate(&settings(false), &phone(), asked, 0).unwrap_err()
        };
        assert_eq!(
            refused(|s| s.url = "http://evil/_matrix/push/v1/notify".into()),
            PusherError::UnknownGateway
        );
        assert_eq!(
            refused(|s| s.format = "full".into()),
            PusherError::ContentOff
        );
        assert!(matches!(
            refused(|s| s.format = "html".into()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.app_id = "with space".into()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.app_id = String::new()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.pushkey = "a\nb".into()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.pushkey = "k".repeat(513)),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.lang = "en;drop".into()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.data_json = "[1]".into()),
            PusherError::Invalid(_)
        ));
        assert!(matches!(
            refused(|s| s.data_json = format!("{{\"a\":\"{}\"}}", "x".repeat(1100))),
            PusherError::Invalid(_)
        ));
        // Under the bound as sent, over it once re-serialised (each `1e2` becomes `100.0`).
        let grows = format!("{{\"a\":[{}1e2]}}", "1e2,".repeat(200));
        assert!(grows.len() <= MAX_DATA);
        assert!(matches!(
            validate(
                &settings(false),
                &phone(),
                pb::PusherSet {
                    data_json: grows,
                    ..set()
                },
                0
            ),
            Err(PusherError::Invalid(_))
        ));
        let off = Settings {
            allowed_urls: Vec::new(),
            ..settings(false)
        };
        assert_eq!(validate(&off, &phone(), set(), 0), Err(PusherError::Off));
    }

    #[test]
    fn content_and_data_where_allowed() {
        let mut asked = set();
        asked.format = "full".into();
        asked.data_json = r#"{ "badge": true }"#.into();
        let pusher = validate(&settings(true), &phone(), asked, 0).unwrap();
        assert_eq!(
            (pusher.format.as_str(), pusher.data_json.as_str()),
            ("full", r#"{"badge":true}"#)
        );
    }
}
