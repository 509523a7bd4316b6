//! Calls to push gateways as the Matrix Push Gateway API defines them: `POST {url}` with a
//! `notification` (event id, room, sender, counts, devices), answered with the pushkeys the
//! gateway rejected. Each call has a deadline; a gateway that keeps failing is left alone
//! for a while (a circuit breaker per URL), so one dead gateway costs nobody else.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// Largest answer read from a gateway.
const MAX_ANSWER: usize = 64 * 1024;
/// Failures in a row after which a gateway is not called for [`OPEN_FOR`].
const TRIP_AFTER: u32 = 5;
const OPEN_FOR: Duration = Duration::from_secs(30);

/// One device a notification is for.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceTarget {
    /// The app, as the gateway knows it.
    pub app_id: String,
    /// The platform's token.
    pub pushkey: String,
    /// When the pushkey was set, in seconds.
    pub pushkey_ts: i64,
    /// The pusher's data (its `format` included), handed on as it was set.
    pub data: serde_json::Value,
}

/// What the user has been sent: the fields of the API's `notification` object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Notification {
    /// Missing for a counts-only update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The conversation, as the user names it (`u/{peer}`, `g/{gid}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// `m.room.message` with the content (format `full` only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Who sent it (format `full` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// `{"msgtype": "m.text", "body": ...}` (format `full` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<serde_json::Value>,
    /// `high` for a message, `low` for a counts-only update.
    pub prio: &'static str,
    /// `{"unread": N}`: the badge, computed.
    pub counts: Counts,
    /// The devices to notify (on this gateway).
    pub devices: Vec<DeviceTarget>,
}

/// The badge.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Unread messages over all the user's conversations.
    pub unread: u64,
}

#[derive(Serialize)]
struct Request<'a> {
    notification: &'a Notification,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    rejected: Vec<String>,
}

/// Why a call did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Worth trying again later: no answer in time, a refused connection, a 5xx, a 429.
    #[error("gateway unavailable: {0}")]
    Unavailable(String),
    /// The gateway refused the request itself (a 4xx): trying again would not help.
    #[error("gateway refused the notification: HTTP {0}")]
    Refused(u16),
    /// The gateway failed too often lately and is not called now.
    #[error("gateway failing, not called until it has rested")]
    Resting,
}

/// The HTTP client for every gateway, with the failure count of each.
pub struct Gateways {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    breakers: Mutex<HashMap<String, Breaker>>,
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Gateways {
    /// Pooled keep-alive connections; every call has `timeout` (connecting included).
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            timeout,
            breakers: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `notification` to the gateway at `url`; the pushkeys it rejected.
    ///
    /// # Errors
    /// The gateway did not take it (see [`GatewayError`]).
    pub async fn notify(
        &self,
        url: &str,
        notification: &Notification,
    ) -> Result<Vec<String>, GatewayError> {
        if self.resting(url) {
            return Err(GatewayError::Resting);
        }
        let answer = tokio::time::timeout(self.timeout, self.post(url, notification))
            .await
            .unwrap_or_else(|_| Err(GatewayError::Unavailable("no answer in time".into())));
        self.record(url, matches!(answer, Err(GatewayError::Unavailable(_))));
        answer
    }

    async fn post(
        &self,
        url: &str,
        notification: &Notification,
    ) -> Result<Vec<String>, GatewayError> {
        let body = serde_json::to_vec(&Request { notification })
            .map_err(|e| GatewayError::Unavailable(format!("encoding: {e}")))?;
        let request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| GatewayError::Refused(0))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| GatewayError::Unavailable(crate::text::clean(&e.to_string(), 200)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|_| GatewayError::Unavailable("answer unreadable or too large".into()))?
            .to_bytes();
        if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
            return Err(GatewayError::Unavailable(format!(
                "HTTP {}",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(GatewayError::Refused(status.as_u16()));
        }
        // A gateway that says nothing more rejected nothing.
        let answer: Answer = serde_json::from_slice(&body).unwrap_or(Answer {
            rejected: Vec::new(),
        });
        Ok(answer.rejected)
    }

    fn resting(&self, url: &str) -> bool {
        let Ok(mut breakers) = self.breakers.lock() else {
            return false;
        };
        let Some(breaker) = breakers.get_mut(url) else {
            return false;
        };
        match breaker.open_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                // Rested: one call may try it again.
                breaker.open_until = None;
                breaker.failures = TRIP_AFTER - 1;
                false
            }
            None => false,
        }
    }

    fn record(&self, url: &str, failed: bool) {
        let Ok(mut breakers) = self.breakers.lock() else {
            return;
        };
        if !failed {
            breakers.remove(url);
            return;
        }
        let breaker = breakers.entry(url.to_owned()).or_default();
        breaker.failures += 1;
        if breaker.failures >= TRIP_AFTER {
            breaker.open_until = Some(Instant::now() + OPEN_FOR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_free_notification_carries_only_ids_counts_and_devices() {
        let notification = Notification {
            event_id: Some("$abc".into()),
            room_id: Some("u/alice".into()),
            kind: None,
            sender: None,
            content: None,
            prio: "high",
            counts: Counts { unread: 3 },
            devices: vec![DeviceTarget {
                app_id: "com.example".into(),
                pushkey: "k".into(),
                pushkey_ts: 7,
                data: serde_json::json!({"format": "event_id_only"}),
            }],
        };
        let json = serde_json::to_value(Request {
            notification: &notification,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"notification": {
                "event_id": "$abc", "room_id": "u/alice", "prio": "high",
                "counts": {"unread": 3},
                "devices": [{"app_id": "com.example", "pushkey": "k", "pushkey_ts": 7,
                             "data": {"format": "event_id_only"}}]
            }})
        );
    }

    #[test]
    fn a_gateway_rests_after_failures_in_a_row_then_gets_one_try() {
        let gateways = Gateways::new(Duration::from_secs(1));
        let url = "http://gw/_matrix/push/v1/notify";
        for _ in 0..TRIP_AFTER - 1 {
            gateways.record(url, true);
        }
        assert!(!gateways.resting(url));
        gateways.record(url, true);
        assert!(gateways.resting(url));
        if let Ok(mut breakers) = gateways.breakers.lock() {
            breakers.get_mut(url).unwrap().open_until = Some(Instant::now());
        }
        assert!(!gateways.resting(url), "rested: tried again");
        gateways.record(url, true);
        assert!(
            gateways.resting(url),
            "and resting again at once if it still fails"
        );
        gateways.record(url, false);
        assert!(!gateways.resting(url));
    }
}
