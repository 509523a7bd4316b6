//! A push gateway in a process of its own (`tests/fixtures/push_gateway.py`, speaking the
//! Matrix Push Gateway API over HTTP), with the notifications it took.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use mqtt_im::wire::pb;

use super::{request, Client, Node, WAIT};

/// What the gateway did with one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Taken (200).
    Taken,
    /// Answered 503.
    Refused,
    /// Held unanswered.
    Held,
}

/// The gateway process and what it printed.
pub struct Gateway {
    process: Node,
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<(Handled, serde_json::Value)>,
}

impl Gateway {
    pub fn start() -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/push_gateway.py"
        );
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the test gateway");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let port: u16 = first
            .trim()
            .strip_prefix("listening on ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let (sender, seen) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let Some((what, json)) = line.split_once(' ') else {
                    continue;
                };
                let handled = match what {
                    "notify" => Handled::Taken,
                    "refused" => Handled::Refused,
                    "held" => Handled::Held,
                    _ => continue,
                };
                let _ = sender.send((handled, serde_json::from_str(json).unwrap()));
            }
        });
        Self {
            process: Node::from(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            seen,
        }
    }

    /// The notify URL, for `push.allowed_urls`.
    pub fn url(&self) -> String {
        format!("http://{}/_matrix/push/v1/notify", self.addr)
    }

    /// The next notification the gateway took (its `notification` object).
    pub async fn next(&mut self) -> serde_json::Value {
        loop {
            let (handled, notification) = self.next_seen().await;
            if handled == Handled::Taken {
                return notification;
            }
        }
    }

    /// The next notification that reached the gateway, and what it did with it.
    pub async fn next_seen(&mut self) -> (Handled, serde_json::Value) {
        let (handled, body) = tokio::time::timeout(WAIT * 3, self.seen.recv())
            .await
            .expect("no notification reached the gateway")
            .expect("the gateway process ended");
        (handled, body["notification"].clone())
    }

    /// Fails if a notification reaches the gateway within `quiet`, or if it is not running.
    pub async fn none_within(&mut self, quiet: Duration) {
        assert!(
            matches!(self.process.try_wait(), Ok(None)),
            "the gateway process ended"
        );
        if let Ok(taken) = tokio::time::timeout(quiet, self.seen.recv()).await {
            panic!("unexpected notification: {taken:?}");
        }
        assert!(
            matches!(self.process.try_wait(), Ok(None)),
            "the gateway process ended"
        );
    }

    /// Makes the next `count` notifications fail with 503.
    pub async fn fail_next(&self, count: u32) {
        self.control(&serde_json::json!({ "fail": count })).await;
    }

    /// Keeps every notification unanswered (`true`) until released (`false`).
    pub async fn hold(&self, hold: bool) {
        self.control(&serde_json::json!({ "hold": hold })).await;
    }

    /// Rejects these pushkeys from now on.
    pub async fn reject(&self, pushkeys: &[&str]) {
        self.control(&serde_json::json!({ "reject": pushkeys }))
            .await;
    }

    async fn control(&self, body: &serde_json::Value) {
        let body = body.to_string();
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "POST /control HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

/// `uid`'s device `client_id` registers a pusher (`pushkey`, `format`) for `gateway`, then
/// goes away: nothing of that user is online after it.
pub async fn register_and_leave(
    addr: SocketAddr,
    uid: &str,
    client_id: &str,
    gateway: &Gateway,
    format: &str,
) {
    let mut device = Client::v5(addr, client_id, uid).await;
    device.subscribe(&format!("im/u/{uid}/#"), 1).await;
    let _ = device.digest(uid).await;
    let set = pb::PusherSet {
        app_id: "com.example.chat".into(),
        pushkey: format!("{uid}-token"),
        url: gateway.url(),
        format: format.into(),
        data_json: r#"{"tag": "x"}"#.into(),
        ..pb::PusherSet::default()
    };
    let answer = device
        .ask(uid, request("p", pb::request::Kind::PusherSet(set)))
        .await;
    assert_eq!(answer.status, pb::Status::Ok as i32, "{answer:?}");
    device.disconnect().await;
}
