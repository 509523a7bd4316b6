//! Real rumqttc clients (3.1.1 and 5) whose packets arrive on a channel.

use std::net::SocketAddr;
use std::time::Duration;

use mqtt_im::wire::pb;
use prost::Message;
use tokio::sync::mpsc;

use super::WAIT;

/// A filter in every other user's IM tree: mqtt-im refuses it in its SUBACK without opening
/// a rumqttd link or changing anything, so subscribing to it is a round trip with no effect.
pub const QUIET_PROBE: &str = "im/u/+/quiet-probe";

/// What a client saw.
#[derive(Debug, Clone)]
pub enum Seen {
    Publish {
        topic: String,
        payload: Vec<u8>,
        /// MQTT 5 Correlation Data, if any.
        correlation: Option<Vec<u8>>,
        qos: u8,
        retain: bool,
        /// MQTT 5 properties as delivered (3.1.1: none).
        properties: Option<Box<rumqttc::v5::mqttbytes::v5::PublishProperties>>,
    },
    PubAck {
        pkid: u16,
        reason: u8,
        /// MQTT 5 reason string, if any.
        reason_string: Option<String>,
    },
    SubAck {
        codes: Vec<u8>,
    },
    PubComp {
        pkid: u16,
    },
    /// MQTT 5 reason codes (3.1.1 has none: empty).
    UnsubAck {
        codes: Vec<u8>,
    },
    /// A DISCONNECT from the server (MQTT 5) with its reason code.
    Disconnect {
        reason: u8,
    },
}

/// 3.1.1 options for `user` (password `pw`) with a QoS 1 will of `gone` on `will_topic`.
pub fn options_with_will(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    will_topic: &str,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, "pw");
    options.set_last_will(rumqttc::LastWill::new(
        will_topic,
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    options
}

/// A 3.1.1 client (rumqttc) whose events arrive on a channel.
pub struct Client {
    pub v4: Option<rumqttc::AsyncClient>,
    pub v5: Option<rumqttc::v5::AsyncClient>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    /// What arrived while a helper waited for something else (a digest before a SUBACK),
    /// handed out first by `next`.
    held: std::collections::VecDeque<Seen>,
    task: tokio::task::JoinHandle<()>,
    /// The CONNACK's session present flag.
    pub session_present: bool,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One step of a client's event loop, as the tests see it.
enum Step {
    /// The CONNACK: `Some(session present)` if accepted.
    Connected(Option<bool>),
    Seen(Seen),
    Skip,
}

/// The two rumqttc event loops, driven the same way.
trait EventSource: Send + 'static {
    /// `None` when the connection ended.
    fn step(&mut self) -> impl std::future::Future<Output = Option<Step>> + Send;
}

impl EventSource for rumqttc::EventLoop {
    async fn step(&mut self) -> Option<Step> {
        use rumqttc::{Event, Packet, SubscribeReasonCode as C};
        let packet = match self.poll().await.ok()? {
            Event::Incoming(packet) => packet,
            // After a DISCONNECT the loop polls on until the server closes the connection
            // (an error ends it: polling after that would reconnect).
            Event::Outgoing(_) => return Some(Step::Skip),
        };
        Some(match packet {
            Packet::ConnAck(ack) => {
                let ok = ack.code == rumqttc::ConnectReturnCode::Success;
                Step::Connected(ok.then_some(ack.session_present))
            }
            Packet::Publish(p) => Step::Seen(Seen::Publish {
                topic: p.topic,
                payload: p.payload.to_vec(),
                correlation: None,
                qos: p.qos as u8,
                retain: p.retain,
                properties: None,
            }),
            Packet::PubAck(a) => Step::Seen(Seen::PubAck {
                pkid: a.pkid,
                reason: 0,
                reason_string: None,
            }),
            Packet::PubComp(c) => Step::Seen(Seen::PubComp { pkid: c.pkid }),
            Packet::SubAck(s) => Step::Seen(Seen::SubAck {
                codes: s
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        C::Success(q) => *q as u8,
                        C::Failure => 0x80,
                    })
                    .collect(),
            }),
            Packet::UnsubAck(_) => Step::Seen(Seen::UnsubAck { codes: Vec::new() }),
            _ => Step::Skip,
        })
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    async fn step(&mut self) -> Option<Step> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{ConnectionError, Event, StateError};
        let event = match self.poll().await {
            Ok(event) => event,
            Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code, ..
            })) => {
                let reason = reason_code as u8;
                return Some(Step::Seen(Seen::Disconnect { reason }));
            }
            Err(_) => return None,
        };
        let packet = match event {
            Event::Incoming(packet) => packet,
            // After a DISCONNECT the loop polls on until the server closes the connection
            // (an error ends it: polling after that would reconnect).
            Event::Outgoing(_) => return Some(Step::Skip),
        };
        Some(match packet {
            Packet::ConnAck(ack) => Step::Connected(Some(ack.session_present)),
            Packet::Publish(p) => Step::Seen(Seen::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                correlation: p
                    .properties
                    .as_ref()
                    .and_then(|props| props.correlation_data.as_ref())
                    .map(|data| data.to_vec()),
                qos: p.qos as u8,
                retain: p.retain,
                properties: p.properties.map(Box::new),
            }),
            Packet::PubAck(a) => Step::Seen(Seen::PubAck {
                pkid: a.pkid,
                reason: v5_ack_code(a.reason),
                reason_string: a.properties.and_then(|p| p.reason_string),
            }),
            Packet::PubComp(c) => Step::Seen(Seen::PubComp { pkid: c.pkid }),
            Packet::SubAck(s) => Step::Seen(Seen::SubAck {
                codes: s.return_codes.iter().map(v5_code).collect(),
            }),
            Packet::UnsubAck(u) => Step::Seen(Seen::UnsubAck {
                codes: u.reasons.iter().map(v5_unsuback_code).collect(),
            }),
            _ => Step::Skip,
        })
    }
}

/// Drives `events` in a task until the CONNACK, then forwards what the client sees.
/// Returns what the client sees, the task, and the CONNACK's session present flag.
async fn pump(
    mut events: impl EventSource,
) -> (
    mpsc::UnboundedReceiver<Seen>,
    tokio::task::JoinHandle<()>,
    bool,
) {
    let (tx, seen) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        while let Some(step) = events.step().await {
            match step {
                Step::Connected(ok) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(ok);
                    }
                }
                Step::Seen(event) => {
                    let ended = matches!(event, Seen::Disconnect { .. });
                    let _ = tx.send(event);
                    if ended {
                        // Polling on would reconnect.
                        break;
                    }
                }
                Step::Skip => {}
            }
        }
        if let Some(r) = ready_tx.take() {
            let _ = r.send(None);
        }
    });
    let connected = tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
    let session_present = connected.expect("connect failed");
    (seen, task, session_present)
}

impl Client {
    /// Connects with MQTT 3.1.1 and waits for the CONNACK.
    pub async fn v4(addr: SocketAddr, client_id: &str, user: &str, keep_alive: u64) -> Self {
        Self::v4_session(addr, client_id, user, keep_alive, true).await
    }

    /// Connects with MQTT 3.1.1 and the given clean-session flag.
    pub async fn v4_session(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        keep_alive: u64,
        clean: bool,
    ) -> Self {
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, "pw");
        options.set_keep_alive(Duration::from_secs(keep_alive));
        options.set_clean_session(clean);
        Self::v4_with(options).await
    }

    /// Connects with MQTT 3.1.1 with these options (transport, credentials) and waits for the
    /// CONNACK.
    pub async fn v4_with(options: rumqttc::MqttOptions) -> Self {
        let (client, events) = rumqttc::AsyncClient::new(options, 100);
        let (seen, task, session_present) = pump(events).await;
        Self {
            v4: Some(client),
            v5: None,
            seen,
            held: Default::default(),
            task,
            session_present,
        }
    }

    /// Connects with MQTT 5 and waits for the CONNACK.
    pub async fn v5(addr: SocketAddr, client_id: &str, user: &str) -> Self {
        Self::v5_max_packet(addr, client_id, user, None).await
    }

    /// Connects with MQTT 5 announcing a Maximum Packet Size.
    pub async fn v5_max_packet(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        max_packet: Option<u32>,
    ) -> Self {
        use rumqttc::v5;
        let mut options = v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(user, "pw");
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(max_packet);
        Self::v5_with(options).await
    }

    /// Connects with MQTT 5 with these options and waits for the CONNACK.
    pub async fn v5_with(options: rumqttc::v5::MqttOptions) -> Self {
        let (client, events) = rumqttc::v5::AsyncClient::new(options, 100);
        let (seen, task, session_present) = pump(events).await;
        Self {
            v4: None,
            v5: Some(client),
            seen,
            held: Default::default(),
            task,
            session_present,
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<u8> {
        if let Some(c) = &self.v4 {
            c.subscribe(filter, rumqttc::qos(qos).unwrap())
                .await
                .expect("the connection ended");
        } else if let Some(c) = &self.v5 {
            c.subscribe(filter, rumqttc::v5::mqttbytes::qos(qos).unwrap())
                .await
                .expect("the connection ended");
        }
        self.suback().await
    }

    /// Subscribes (MQTT 5) with a filter's options and a Subscription Identifier; the
    /// SUBACK's codes.
    pub async fn subscribe_with(
        &mut self,
        filter: rumqttc::v5::mqttbytes::v5::Filter,
        id: Option<usize>,
    ) -> Vec<u8> {
        let client = self.v5.as_ref().expect("an MQTT 5 client");
        let properties = rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        client
            .subscribe_many_with_properties(vec![filter], properties)
            .await
            .expect("the connection ended");
        self.suback().await
    }

    /// The next SUBACK's codes (what arrives before it is held for `next`).
    async fn suback(&mut self) -> Vec<u8> {
        self.next_holding(|seen| match seen {
            Seen::SubAck { codes } => Ok(codes),
            other => Err(other),
        })
        .await
    }

    /// Unsubscribes from `filter` and returns the UNSUBACK's reason codes (MQTT 5).
    pub async fn unsubscribe(&mut self, filter: &str) -> Vec<u8> {
        if let Some(c) = &self.v4 {
            c.unsubscribe(filter).await.expect("the connection ended");
        } else if let Some(c) = &self.v5 {
            c.unsubscribe(filter).await.expect("the connection ended");
        }
        self.next_holding(|seen| match seen {
            Seen::UnsubAck { codes } => Ok(codes),
            other => Err(other),
        })
        .await
    }

    pub async fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) {
        self.publish_retain(topic, qos, false, payload).await;
    }

    /// Publishes with the retain flag as given.
    pub async fn publish_retain(&self, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) {
        if let Some(c) = &self.v4 {
            c.publish(topic, rumqttc::qos(qos).unwrap(), retain, payload)
                .await
                .unwrap();
        } else if let Some(c) = &self.v5 {
            c.publish(
                topic,
                rumqttc::v5::mqttbytes::qos(qos).unwrap(),
                retain,
                payload,
            )
            .await
            .unwrap();
        }
    }

    /// Publishes at QoS 1 with MQTT 5 properties (an MQTT 5 client only).
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        let client = self.v5.as_ref().expect("an MQTT 5 client");
        let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
        client
            .publish_with_properties(topic, qos, false, payload.into(), properties)
            .await
            .unwrap();
    }

    /// Publishes at QoS 1 and returns the PUBACK reason code.
    pub async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) -> u8 {
        self.publish_answered(topic, payload).await.0
    }

    /// Publishes at QoS 1 and returns the PUBACK reason code and reason string.
    pub async fn publish_answered(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> (u8, Option<String>) {
        self.publish(topic, 1, payload).await;
        self.puback().await
    }

    /// Publishes a retained message at QoS 1 and returns the PUBACK reason code, once the
    /// broker has taken it (retained from then on).
    pub async fn retain_acked(&mut self, topic: &str, payload: Vec<u8>) -> u8 {
        self.publish_retain(topic, 1, true, payload).await;
        self.puback().await.0
    }

    /// The next PUBACK's reason code and reason string, skipping other packets.
    async fn puback(&mut self) -> (u8, Option<String>) {
        loop {
            if let Seen::PubAck {
                reason,
                reason_string,
                ..
            } = self.next().await
            {
                return (reason, reason_string);
            }
        }
    }

    /// The first packet `pick` takes; the ones before it stay for `next`, in order.
    async fn next_holding<T>(&mut self, pick: impl Fn(Seen) -> Result<T, Seen>) -> T {
        let mut passed = Vec::new();
        let picked = loop {
            match pick(self.next().await) {
                Ok(picked) => break picked,
                Err(other) => passed.push(other),
            }
        };
        for seen in passed.into_iter().rev() {
            self.held.push_front(seen);
        }
        picked
    }

    pub async fn next(&mut self) -> Seen {
        if let Some(seen) = self.held.pop_front() {
            return seen;
        }
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("timed out waiting for a packet")
            .expect("connection ended")
    }

    /// The next publish on `topic`, skipping other packets.
    pub async fn next_on(&mut self, topic: &str) -> Vec<u8> {
        self.next_with_correlation(topic).await.0
    }

    /// The next publish (topic, payload, QoS, retain flag, properties), skipping other
    /// packets.
    pub async fn next_publish(&mut self) -> Seen {
        loop {
            let seen = self.next().await;
            if matches!(seen, Seen::Publish { .. }) {
                return seen;
            }
        }
    }

    /// The next publish on `topic` with its Correlation Data.
    pub async fn next_with_correlation(&mut self, topic: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        loop {
            if let Seen::Publish {
                topic: t,
                payload,
                correlation,
                ..
            } = self.next().await
            {
                if t == topic {
                    return (payload, correlation);
                }
            }
        }
    }

    /// The reason code of the server's DISCONNECT (MQTT 5), skipping other packets.
    pub async fn disconnect_reason(&mut self) -> u8 {
        loop {
            if let Seen::Disconnect { reason } = self.next().await {
                return reason;
            }
        }
    }

    /// Waits until the server closes the connection (whatever arrives before).
    pub async fn closed(&mut self) {
        let ended =
            tokio::time::timeout(WAIT, async { while self.seen.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "the connection stayed open");
    }

    /// `None` if nothing at all arrives within `wait` on a connection that is still alive,
    /// else the first packet that did arrive. Silence on a dead connection proves nothing:
    /// a connection that ended meanwhile fails the test, and after the wait a round trip
    /// (a SUBSCRIBE the server refuses, answered in turn behind this connection's earlier
    /// work) shows it alive. For mqtt-im only; [`Client::within`] waits without the probe.
    pub async fn quiet_for(&mut self, wait: Duration) -> Option<Seen> {
        if let Some(seen) = self.within(wait).await {
            return Some(seen);
        }
        self.round_trip().await;
        self.held.pop_front()
    }

    /// A round trip to mqtt-im that changes nothing (a SUBSCRIBE it refuses): everything the
    /// connection sent before has been handled once it returns, and anything the server
    /// wrote before its answer is held for `next`.
    pub async fn round_trip(&mut self) {
        let codes = self.subscribe(QUIET_PROBE, 1).await;
        assert!(
            codes.iter().all(|code| *code >= 0x80),
            "probe granted: {codes:?}"
        );
    }

    /// The next packet if one arrives within `wait`; a connection that ended fails the test.
    pub async fn within(&mut self, wait: Duration) -> Option<Seen> {
        if let Some(seen) = self.held.pop_front() {
            return Some(seen);
        }
        match tokio::time::timeout(wait, self.seen.recv()).await {
            Ok(Some(seen)) => Some(seen),
            Ok(None) => panic!("the connection ended while the test waited"),
            Err(_) => None,
        }
    }
    pub async fn digest(&mut self, uid: &str) -> pb::Digest {
        let bytes = self.next_on(&format!("im/u/{uid}/digest")).await;
        pb::Digest::decode(bytes.as_slice()).unwrap()
    }

    pub async fn response(&mut self, uid: &str) -> pb::Response {
        let bytes = self.next_on(&format!("im/u/{uid}/resp")).await;
        pb::Response::decode(bytes.as_slice()).unwrap()
    }

    /// Sends a request on `req` and returns the response.
    pub async fn ask(&mut self, uid: &str, request: Vec<u8>) -> pb::Response {
        self.publish(&format!("im/u/{uid}/req"), 1, request).await;
        self.response(uid).await
    }

    /// Disconnects and waits until the server has closed the connection: by then it has
    /// ended the session's presence and let go of its client id.
    pub async fn disconnect(mut self) {
        if let Some(c) = &self.v4 {
            let _ = c.disconnect().await;
        } else if let Some(c) = &self.v5 {
            let _ = c.disconnect().await;
        }
        let closed = tokio::time::timeout(WAIT, &mut self.task).await;
        assert!(
            closed.is_ok(),
            "the server kept the connection after DISCONNECT"
        );
    }
}

fn v5_unsuback_code(reason: &rumqttc::v5::mqttbytes::v5::UnsubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::UnsubAckReason as R;
    match reason {
        R::Success => 0,
        R::NoSubscriptionExisted => 0x11,
        _ => 0x80,
    }
}

fn v5_code(code: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
    match code {
        C::Success(qos) => *qos as u8,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8f,
        _ => 0x80,
    }
}

fn v5_ack_code(reason: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match reason {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// Whether the connection attempt ends without a successful CONNACK.
pub async fn refused(options: rumqttc::MqttOptions) -> bool {
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return ack.code != rumqttc::ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    })
    .await;
    outcome.expect("neither accepted nor refused")
}
