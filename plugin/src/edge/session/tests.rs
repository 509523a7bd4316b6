//! The session without sockets: byte fixtures in, effects out.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Filter, Packet, QoS, Subscribe};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{End, Op, Session, Terms};
use crate::auth::{Authenticator, Identity};
use crate::config::Config;
use crate::domain::testing::{device, direct};
use crate::edge::codec::{self, kind, Frame, Protocol, PublishView};
use crate::edge::sink::ConnectionSink;
use crate::edge::EdgeContext;
use crate::im::{DeviceEvent, ImService};
use crate::metrics::Metrics;
use crate::policy::LuaPolicy;
use crate::store::EmbeddedStore;

/// A session of `alice` on a context over a fresh embedded store, and what its effects
/// asked for so far, as the connection would carry them out.
struct Fixture {
    session: Session,
    /// Bytes written to the client, and to rumqttd, not read by the test yet.
    client: BytesMut,
    rumqttd: BytesMut,
    /// Operations started and not run yet.
    started: Vec<Op>,
    /// Times the session asked for the rumqttd link.
    links_asked: usize,
    /// Why the session said it is over, if it did.
    end: Option<End>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Takes the session's effects, as the connection loop does after each input.
    fn collect(&mut self) {
        let effects = self.session.take_effects();
        self.client.unsplit(effects.to_client);
        self.rumqttd.unsplit(effects.to_rumqttd);
        self.started.extend(effects.started);
        self.links_asked += usize::from(effects.open_link);
        if let Some(end) = effects.end {
            self.end = Some(end);
        }
    }

    /// Whether the session asked for the rumqttd link since the last call.
    fn take_open_link(&mut self) -> bool {
        self.collect();
        std::mem::take(&mut self.links_asked) > 0
    }

    fn on_event(&mut self, event: DeviceEvent) {
        self.session.on_device_event(event);
        self.collect();
    }

    fn leave(&mut self, end: &End) {
        self.session.leave(end);
        self.collect();
    }

    /// The session now has a link to rumqttd, as if the client had needed it earlier.
    fn link(&mut self) {
        let _ = self.session.rumqttd_out();
        self.collect();
        self.links_asked = 0;
    }
}

/// What a test changes about the client.
#[derive(Default)]
struct Client {
    v4: bool,
    keep_alive: u16,
    clean: bool,
    max_packet: Option<usize>,
    receive_max: Option<u16>,
    acl: Option<serde_json::Value>,
    max_pending: Option<usize>,
}

fn fixture(client: Client) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::default();
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("im.db"), 64).unwrap());
    let policy = Arc::new(LuaPolicy::load(config.policy.clone()).unwrap());
    let auth = Arc::new(Authenticator::new(&config.auth, None).unwrap());
    let im = ImService::new(
        store,
        policy.clone(),
        config.im.clone(),
        config.push.clone(),
        None,
        metrics,
    );
    let lua: Arc<dyn crate::hook::Hook> = Arc::new(crate::policy::PolicyHook::new(
        policy,
        config.policy.on_error,
    ));
    let hooks = crate::hook::Hooks::new(vec![lua], Arc::new(Metrics::default()));
    let broker = super::super::PrivateBroker {
        listeners: Vec::new(),
        secret: "secret".into(),
        max_packet: config.broker.max_packet_size,
        connect_timeout: config.broker.connect_timeout.0,
    };
    let ctx = Arc::new(EdgeContext::new(
        im,
        hooks,
        auth,
        broker,
        &config.im.prefix,
        config.limits.clone(),
        None,
    ));
    let (events, _) = mpsc::channel(8);
    let sink = Arc::new(ConnectionSink {
        events,
        kick: CancellationToken::new(),
        evict: CancellationToken::new(),
    });
    let terms = Terms {
        version: if client.v4 {
            Protocol::V4
        } else {
            Protocol::V5
        },
        client: Arc::new(crate::hook::Client {
            uid: "alice".into(),
            client_id: "phone".into(),
            username: Some("alice".into()),
            protocol: if client.v4 {
                Protocol::V4
            } else {
                Protocol::V5
            },
            listener: "mqtt".into(),
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 50000)),
            clean_session: client.clean,
            keep_alive: client.keep_alive,
        }),
        listener: Arc::new(crate::edge::Listener {
            name: "mqtt".into(),
            transport: crate::edge::Transport::Tcp,
            ws_path: None,
            max_packet: config.broker.max_packet_size,
            connect_timeout: Duration::from_secs(5),
            admission: crate::edge::Admission::Chain,
            version: None,
            max_pending: client.max_pending,
        }),
        client_id: "phone".into(),
        moved: None,
        im: Some(device("alice", "phone")),
        username: Some("alice".into()),
        identity: Identity {
            uid: "alice".into(),
            superuser: false,
            acl: client
                .acl
                .map(|rules| crate::auth::acl::rules_from_json(&rules).unwrap()),
            expires: None,
        },
        keep_alive: client.keep_alive,
        clean_start: client.clean,
        lifetime: crate::edge::expiry::Lifetime::of(
            if client.v4 {
                Protocol::V4
            } else {
                Protocol::V5
            },
            client.clean,
            (!client.clean).then_some(u32::MAX),
        ),
        limits: super::ClientLimits {
            max_packet: client.max_packet,
            receive_max: client.receive_max,
            topic_alias_max: None,
            inbound_max: u16::MAX,
        },
    };
    let session = Session::new(ctx, 1, terms, false, sink);
    Fixture {
        session,
        client: BytesMut::new(),
        rumqttd: BytesMut::new(),
        started: Vec::new(),
        links_asked: 0,
        end: None,
        _dir: dir,
    }
}

/// Feeds raw client bytes, frame by frame.
fn from_client(f: &mut Fixture, bytes: &[u8]) {
    let mut input = BytesMut::from(bytes);
    while let Some(frame) = codec::next_frame(&mut input, 1 << 20).unwrap() {
        f.session.on_client_frame(frame, Instant::now()).unwrap();
        f.collect();
    }
    assert!(input.is_empty(), "a partial frame in the fixture");
}

/// Feeds raw bytes from rumqttd, frame by frame.
fn from_rumqttd(f: &mut Fixture, bytes: &[u8]) {
    let mut input = BytesMut::from(bytes);
    while let Some(frame) = codec::next_frame(&mut input, 1 << 20).unwrap() {
        f.session.on_upstream_frame(frame).unwrap();
        f.collect();
    }
}

/// Runs the started operations, and those they start, applying each in order.
async fn settle(f: &mut Fixture) {
    f.collect();
    while !f.started.is_empty() {
        for op in std::mem::take(&mut f.started) {
            let finished = op.await;
            f.session.on_outcome(finished).unwrap();
            f.collect();
        }
    }
}

/// Takes the bytes written to the client, split into frames.
fn to_client(f: &mut Fixture) -> Vec<Frame> {
    f.collect();
    split_frames(&mut f.client)
}

fn split_frames(out: &mut BytesMut) -> Vec<Frame> {
    let mut all = Vec::new();
    while let Some(frame) = codec::next_frame(out, 1 << 20).unwrap() {
        all.push(frame);
    }
    all
}

fn subscribe(version: Protocol, pkid: u16, filters: &[&str]) -> BytesMut {
    let filters = filters
        .iter()
        .map(|path| Filter {
            path: (*path).to_owned(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    let mut out = BytesMut::new();
    let packet = Packet::Subscribe(Subscribe { pkid, filters }, None);
    codec::write_packet(&mut out, version, packet).unwrap();
    out
}

fn publishes_on(frames: &[Frame], version: Protocol, topic: &str) -> Vec<PublishView> {
    frames
        .iter()
        .filter(|f| f.kind() == kind::PUBLISH)
        .map(|f| PublishView::parse(f, version).unwrap())
        .filter(|p| p.topic_str() == topic)
        .collect()
}

fn notice(f: &mut Fixture, text: &'static str) {
    f.on_event(DeviceEvent::Notice(Bytes::from_static(text.as_bytes())));
}

#[tokio::test]
async fn a_v4_publish_reaches_rumqttd_as_v5_and_asks_for_the_link_once() {
    let mut f = fixture(Client {
        v4: true,
        ..Client::default()
    });
    let s = &mut f;
    // 3.1.1 PUBLISH QoS 1, topic "a/b", packet id 5, payload "hi".
    from_client(s, &[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 5, b'h', b'i']);
    assert!(s.take_open_link());
    // MQTT 5: the same, carrying the publisher's QoS and retain flag for the way out.
    let frame = codec::next_frame(&mut s.rumqttd, 1 << 20).unwrap().unwrap();
    let upstream = PublishView::parse(&frame, Protocol::V5).unwrap();
    assert_eq!(
        (upstream.topic_str(), upstream.pkid, upstream.qos()),
        ("a/b", 5, 1)
    );
    assert_eq!(&upstream.payload[..], b"hi");
    let (carried, rest) = crate::edge::carry::take(&upstream.properties);
    let carried = carried.unwrap();
    assert_eq!((carried.qos, carried.retain, rest.len()), (1, false, 0));
    assert_eq!(carried.publisher, crate::edge::carry::publisher("phone"));
    from_client(s, &[0x30, 5, 0, 1, b'c', b'x', b'y']);
    assert!(!s.take_open_link(), "the link is asked for once");
    assert!(s.session.linked);
    assert!(s.client.is_empty(), "rumqttd answers pass-through");
}

#[tokio::test]
async fn rumqttd_publishes_get_client_packet_ids_and_acks_map_back() {
    let mut f = fixture(Client {
        v4: true,
        ..Client::default()
    });
    let s = &mut f;
    s.link();
    // MQTT 5 PUBLISH QoS 1 from rumqttd with its packet id 300.
    from_rumqttd(
        s,
        &[0x32, 10, 0, 3, b'a', b'/', b'b', 0x01, 0x2c, 0, b'h', b'i'],
    );
    // To the 3.1.1 client: without properties, under the client-side id 1.
    assert_eq!(
        &s.client[..],
        &[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 1, b'h', b'i']
    );
    s.client.clear();
    from_client(s, &[0x40, 2, 0, 1]);
    assert_eq!(
        &s.rumqttd[..],
        &[0x40, 2, 0x01, 0x2c],
        "PUBACK under rumqttd's id"
    );
    // A hook-layer publish meanwhile never reuses an id rumqttd's publish holds.
    from_rumqttd(
        s,
        &[0x32, 10, 0, 3, b'a', b'/', b'b', 0x01, 0x2d, 0, b'h', b'i'],
    );
    notice_after_subscribing(s, Protocol::V4).await;
    let frames = to_client(s);
    let ids: Vec<u16> = frames
        .iter()
        .filter(|f| f.kind() == kind::PUBLISH)
        .map(|f| PublishView::parse(f, Protocol::V4).unwrap().pkid)
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
}

/// Subscribes to the user's response topic and pushes one notice to it.
async fn notice_after_subscribing(s: &mut Fixture, version: Protocol) {
    from_client(s, &subscribe(version, 9, &["im/u/alice/resp"]));
    settle(s).await;
    notice(s, "receipt");
}

#[tokio::test]
async fn the_topic_acl_answers_in_each_protocols_terms() {
    let acl = serde_json::json!({"all": ["allowed/#"]});
    for v4 in [false, true] {
        let version = if v4 { Protocol::V4 } else { Protocol::V5 };
        let mut f = fixture(Client {
            v4,
            acl: Some(acl.clone()),
            ..Client::default()
        });
        let s = &mut f;
        let mut publish = BytesMut::new();
        codec::write_publish(&mut publish, version, 1 << 1, b"other", 7, &[], b"x");
        from_client(s, &publish);
        from_client(s, &subscribe(version, 8, &["other/#", "allowed/#"]));
        settle(s).await;
        let frames = to_client(s);
        let puback = frames.iter().find(|f| f.kind() == kind::PUBACK).unwrap();
        let suback = frames.iter().find(|f| f.kind() == kind::SUBACK);
        if v4 {
            // 3.1.1 has no refusal in PUBACK: acknowledged and dropped.
            assert_eq!(&puback.bytes[..], &[0x40, 2, 0, 7]);
        } else {
            // PUBACK 0x87 Not authorized, with a reason string.
            assert_eq!(puback.bytes[4], 0x87);
        }
        // The allowed filter goes to rumqttd, whose SUBACK completes the answer.
        assert!(suback.is_none());
        let asked = split_frames(&mut s.rumqttd);
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].kind(), kind::SUBSCRIBE);
        from_rumqttd(s, &[0x90, 4, 0, 8, 0, 1]);
        let frames = to_client(s);
        let Packet::SubAck(suback, _) = frames[0].decode(version, 1 << 20).unwrap() else {
            panic!("no SUBACK");
        };
        let codes: Vec<_> = suback.return_codes.iter().map(suback_byte).collect();
        let refused = if v4 { 0x80 } else { 0x87 };
        assert_eq!(codes, vec![refused, 1]);
    }
}

fn suback_byte(code: &rumqttd::protocol::SubscribeReasonCode) -> u8 {
    use rumqttd::protocol::SubscribeReasonCode as Code;
    match code {
        Code::Success(qos) => *qos as u8,
        Code::QoS0 => 0,
        Code::QoS1 => 1,
        Code::QoS2 => 2,
        Code::Failure => 0x80,
        Code::NotAuthorized => 0x87,
        _ => 0xff,
    }
}

#[tokio::test]
async fn the_digest_comes_once_per_connection() {
    let mut f = fixture(Client::default());
    let s = &mut f;
    from_client(s, &subscribe(Protocol::V5, 1, &["im/u/alice/digest"]));
    from_client(s, &subscribe(Protocol::V5, 2, &["im/u/alice/#"]));
    settle(s).await;
    from_client(s, &subscribe(Protocol::V5, 3, &["im/u/alice/digest"]));
    settle(s).await;
    let frames = to_client(s);
    assert_eq!(
        frames.iter().filter(|f| f.kind() == kind::SUBACK).count(),
        3
    );
    assert_eq!(
        publishes_on(&frames, Protocol::V5, "im/u/alice/digest").len(),
        1
    );
    assert!(!s.session.linked, "IM topics never need rumqttd");
}

#[tokio::test]
async fn take_over_and_keep_alive_tell_a_v5_client_why() {
    for (end, code) in [(End::TakenOver, 0x8e), (End::KeepAliveExpired, 0x8d)] {
        let mut f = fixture(Client::default());
        f.leave(&end);
        let frames = to_client(&mut f);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].kind(), kind::DISCONNECT);
        assert_eq!(frames[0].bytes[2], code);
    }
    let mut f = fixture(Client {
        v4: true,
        ..Client::default()
    });
    f.leave(&End::TakenOver);
    assert!(f.client.is_empty(), "3.1.1 has no DISCONNECT");
}

#[tokio::test]
async fn keep_alive_ends_a_silent_client_after_one_and_a_half_times() {
    let mut f = fixture(Client {
        keep_alive: 10,
        ..Client::default()
    });
    let start = Instant::now();
    f.session.seen(start);
    assert!(f.session.on_tick(start + Duration::from_secs(15)).is_ok());
    let late = f.session.on_tick(start + Duration::from_millis(15_001));
    assert!(matches!(late, Err(End::KeepAliveExpired)));
    // Anything from the client counts.
    f.session.seen(start + Duration::from_secs(14));
    assert!(f.session.on_tick(start + Duration::from_secs(20)).is_ok());
    let mut f = fixture(Client::default());
    assert!(f
        .session
        .on_tick(start + Duration::from_secs(86_400))
        .is_ok());
}

#[tokio::test]
async fn hook_layer_publishes_respect_the_maximum_packet_size() {
    let mut f = fixture(Client {
        max_packet: Some(64),
        ..Client::default()
    });
    let s = &mut f;
    from_client(s, &subscribe(Protocol::V5, 1, &["im/u/alice"]));
    settle(s).await;
    let _ = to_client(s);
    let conversation = direct("alice", "bob");
    for (seq, size) in [(1, 10), (2, 100), (3, 20)] {
        s.on_event(DeviceEvent::Chat {
            conversation: conversation.clone(),
            seq,
            payload: Bytes::from(vec![b'x'; size]),
        });
    }
    let frames = to_client(s);
    let sizes: Vec<usize> = publishes_on(&frames, Protocol::V5, "im/u/alice")
        .iter()
        .map(|p| p.payload.len())
        .collect();
    assert_eq!(sizes, vec![10, 20], "the big one stays in the backlog");
    assert!(frames.iter().all(|f| f.bytes.len() <= 64));
}

#[tokio::test]
async fn receive_maximum_bounds_hook_layer_publishes_in_flight() {
    let mut f = fixture(Client {
        receive_max: Some(2),
        ..Client::default()
    });
    let s = &mut f;
    from_client(
        s,
        &subscribe(Protocol::V5, 1, &["im/u/alice/resp", "im/u/alice"]),
    );
    settle(s).await;
    let _ = to_client(s);
    for text in ["one", "two", "three", "four"] {
        notice(s, text);
    }
    // A live chat message while the client is at its maximum stays in the backlog.
    s.on_event(DeviceEvent::Chat {
        conversation: direct("alice", "bob"),
        seq: 1,
        payload: Bytes::from_static(b"chat"),
    });
    let sent = to_client(s);
    let first = publishes_on(&sent, Protocol::V5, "im/u/alice/resp");
    let payloads: Vec<&[u8]> = first.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, vec![&b"one"[..], b"two"]);
    assert!(publishes_on(&sent, Protocol::V5, "im/u/alice").is_empty());
    // Each acknowledgement lets one more go, in order.
    let mut ack = BytesMut::new();
    codec::write_ack(&mut ack, kind::PUBACK, first[0].pkid);
    from_client(s, &ack);
    let next = to_client(s);
    let next = publishes_on(&next, Protocol::V5, "im/u/alice/resp");
    assert_eq!(next.len(), 1);
    assert_eq!(&next[0].payload[..], b"three");
    // rumqttd's publishes wait in the same line.
    s.link();
    from_rumqttd(
        s,
        &[0x32, 10, 0, 3, b'a', b'/', b'b', 0x01, 0x2c, 0, b'h', b'i'],
    );
    assert!(s.client.is_empty());
    for publish in [&first[1], &next[0]] {
        let mut ack = BytesMut::new();
        codec::write_ack(&mut ack, kind::PUBACK, publish.pkid);
        from_client(s, &ack);
    }
    let rest = to_client(s);
    let topics: Vec<String> = rest
        .iter()
        .map(|f| {
            PublishView::parse(f, Protocol::V5)
                .unwrap()
                .topic_str()
                .to_owned()
        })
        .collect();
    assert_eq!(topics, vec!["im/u/alice/resp", "a/b"]);
}

#[tokio::test]
async fn a_persistent_session_keeps_what_was_subscribed_before_it_ended() {
    let mut f = fixture(Client::default());
    let s = &mut f;
    from_client(s, &subscribe(Protocol::V5, 1, &["im/u/alice"]));
    from_client(s, &[kind::DISCONNECT << 4, 0]);
    assert!(matches!(s.end, Some(End::ClientDisconnected)));
    // The connection applies what was started before it leaves.
    settle(s).await;
    s.leave(&End::ClientDisconnected);
    let device = s.session.im.clone().unwrap();
    let kept = s.session.ctx.restore_session(&device);
    assert_eq!(kept.get("im/u/alice"), Some(&1));
}

#[tokio::test]
async fn a_listener_bounds_the_packets_a_connection_has_in_progress() {
    let mut f = fixture(Client {
        max_pending: Some(2),
        ..Client::default()
    });
    let s = &mut f;
    let mut requests = BytesMut::new();
    for pkid in 1..=2 {
        codec::write_publish(
            &mut requests,
            Protocol::V5,
            0b0010,
            b"im/u/alice/req",
            pkid,
            &[],
            b"?",
        );
    }
    from_client(s, &requests[..]);
    assert!(
        !s.session.accepts_input(),
        "two requests in progress: no more reading"
    );
    settle(s).await;
    assert!(s.session.accepts_input(), "answered: reading resumes");
}
