//! The `http` provider against an auth service the test runs: allow (with uid and topic
//! rules), deny, next, the request it gets, its cache, and both outage modes when the service
//! stalls or is gone.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::*;
use mqtt_im::config::{HttpAuthSettings, ProviderOutage, ProviderSettings};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A keep-alive HTTP/1.1 auth service: answers by username; `stall` never answers.
struct AuthService {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<Value>>>,
}

fn answer_for(request: &Value) -> Option<(u16, String)> {
    let body = match request["username"].as_str().unwrap_or_default() {
        "stall" => return None,
        "ann" if request["password"] == "ann pw" => json!({
            "result": "allow", "uid": "ann-uid",
            "acl": {"pub": ["fleet/%u/#"], "sub": ["fleet/#"]},
        }),
        "root" => return Some((204, String::new())),
        "ann" | "mallory" => json!({"result": "deny"}),
        "broken" => return Some((500, "oops".into())),
        _ => json!({"result": "next"}),
    };
    Some((200, body.to_string()))
}

impl AuthService {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let (count, seen) = (Arc::clone(&requests), Arc::clone(&last));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, seen) = (Arc::clone(&count), Arc::clone(&seen));
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        let mut length = 0;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        read.read_exact(&mut body).await.unwrap();
                        let request: Value = serde_json::from_slice(&body).unwrap();
                        count.fetch_add(1, Ordering::SeqCst);
                        *seen.lock().unwrap() = Some(request.clone());
                        let Some((status, body)) = answer_for(&request) else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        write
                            .write_all(format!("{head}{body}").as_bytes())
                            .await
                            .unwrap();
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            last,
        }
    }
}

fn provider(addr: SocketAddr, on_error: ProviderOutage, cache_ttl_ms: u64) -> ProviderSettings {
    ProviderSettings::Http(Box::new(HttpAuthSettings {
        url: format!("http://{addr}/mqtt/auth"),
        timeout: mqtt_im::config::Period::millis(300),
        cache_ttl: mqtt_im::config::Period::millis(cache_ttl_ms),
        headers: [("x-api-key".to_string(), "k".to_string())].into(),
        on_error,
    }))
}

async fn code(broker: &TestBroker, user: &str, password: &str) -> u8 {
    raw_connect(broker.addr, true, "probe", true, Some((user, password)))
        .await
        .code
}

#[tokio::test]
async fn the_auth_service_decides() {
    let service = AuthService::start().await;
    let addr = service.addr;
    let broker = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(addr, ProviderOutage::Deny, 0),
            ProviderSettings::Users,
        ];
    })
    .await;
    let mut options = rumqttc::v5::MqttOptions::new("ann-phone", "127.0.0.1", broker.addr.port());
    options.set_credentials("ann", "ann pw");
    let mut ann = Client::v5_with(options).await;
    let request = service.last.lock().unwrap().clone().unwrap();
    assert_eq!(request["client_id"], "ann-phone");
    assert_eq!(request["password"], "ann pw");
    assert_eq!(request["protocol"], "5");
    assert_eq!(request["transport"], "mqtt");
    assert!(request["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(
        ann.subscribe("im/u/ann-uid/#", 1).await,
        vec![1],
        "uid from the service"
    );
    assert_eq!(ann.publish_acked("fleet/ann/x", b"1".to_vec()).await, 0);
    assert_eq!(ann.publish_acked("fleet/bob/x", b"1".to_vec()).await, 0x87);

    assert_eq!(code(&broker, "ann", "wrong").await, 0x86);
    assert_eq!(code(&broker, "mallory", "x").await, 0x86);
    assert_eq!(code(&broker, "root", "x").await, 0, "204 allows");
    // "next": the users table decides.
    assert_eq!(code(&broker, "alice", "pw").await, 0);
    assert_eq!(code(&broker, "alice", "no").await, 0x86);
    // The service failing is an outage: refused as server unavailable.
    assert_eq!(code(&broker, "broken", "x").await, 0x88);
    let v4 = raw_connect(broker.addr, false, "p", true, Some(("broken", "x")))
        .await
        .code;
    assert_eq!(v4, 3);
}

#[tokio::test]
async fn answers_are_cached() {
    let service = AuthService::start().await;
    let addr = service.addr;
    let broker = TestBroker::start_with(move |c| {
        c.auth.providers = vec![provider(addr, ProviderOutage::Deny, 60_000)];
    })
    .await;
    for _ in 0..5 {
        assert_eq!(code(&broker, "ann", "ann pw").await, 0);
        assert_eq!(code(&broker, "ann", "wrong").await, 0x86);
    }
    assert_eq!(service.requests.load(Ordering::SeqCst), 2);
}

/// A stalled service answers nobody within the timeout; a dead one at once. `deny` refuses
/// (0x88), `next` lets the users table decide. Other clients never wait for it.
#[tokio::test]
async fn outages_follow_on_error() {
    let service = AuthService::start().await;
    let addr = service.addr;
    let deny = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(addr, ProviderOutage::Deny, 0),
            ProviderSettings::Users,
        ];
    })
    .await;
    let stalled = tokio::spawn({
        let addr = deny.addr;
        async move {
            raw_connect(addr, true, "s", true, Some(("stall", "x")))
                .await
                .code
        }
    });
    assert_eq!(
        code(&deny, "alice", "pw").await,
        0,
        "not held by the stalled call"
    );
    assert_eq!(stalled.await.unwrap(), 0x88);

    let next = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(addr, ProviderOutage::Next, 0),
            ProviderSettings::Users,
        ];
    })
    .await;
    assert_eq!(
        code(&next, "stall", "x").await,
        0x86,
        "the users table does not know it"
    );

    let gone: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dead = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(gone, ProviderOutage::Next, 0),
            ProviderSettings::Users,
        ];
    })
    .await;
    assert_eq!(code(&dead, "alice", "pw").await, 0);
}
