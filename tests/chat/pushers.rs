//! Pushers over real connections on both backends: a device registers one for an allowed
//! gateway, the user lists and removes them, every field is checked, a pushkey set by another
//! user's device moves there, and a forgotten device's pushers go with it.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use mqtt_im::wire::pb;

const GATEWAY: &str = "http://127.0.0.1:9/_matrix/push/v1/notify";

fn set(pushkey: &str) -> pb::PusherSet {
    pb::PusherSet {
        app_id: "com.example.chat".into(),
        pushkey: pushkey.into(),
        url: GATEWAY.into(),
        lang: "en".into(),
        data_json: r#"{"badge": true}"#.into(),
        ..pb::PusherSet::default()
    }
}

fn ask_set(id: &str, pusher: pb::PusherSet) -> Vec<u8> {
    request(id, pb::request::Kind::PusherSet(pusher))
}

fn listed(answer: &pb::Response) -> Vec<(String, String)> {
    match &answer.result {
        Some(pb::response::Result::Pushers(list)) => list
            .pushers
            .iter()
            .map(|p| (p.client_id.clone(), p.pushkey.clone()))
            .collect(),
        _ => panic!("not a pusher list: {answer:?}"),
    }
}

fn code(answer: &pb::Response) -> i32 {
    answer.error.as_ref().map_or(0, |e| e.code)
}

async fn device(broker: &TestBroker, client_id: &str, uid: &str) -> Client {
    let mut client = Client::v5(broker.addr, client_id, uid).await;
    client.subscribe(&format!("im/u/{uid}/#"), 1).await;
    let _ = client.digest(uid).await;
    client
}

backend_tests! {
/// Set, list, remove; the stored pusher is what was asked, content-free by default.
async fn a_device_sets_lists_and_removes_its_pushers(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.push.allowed_urls = vec![GATEWAY.into()];
    })
    .await;
    let mut phone = device(&broker, "bob-phone", "bob").await;
    let mut tablet = device(&broker, "bob-tablet", "bob").await;
    let answer = phone.ask("bob", ask_set("p1", set("phone-token"))).await;
    assert_eq!(answer.status, pb::Status::Ok as i32, "{answer:?}");
    let Some(pb::response::Result::Pushers(stored)) = &answer.result else {
        panic!("{answer:?}");
    };
    let pusher = &stored.pushers[0];
    assert_eq!(
        (pusher.format.as_str(), pusher.data_json.as_str(), pusher.url.as_str()),
        ("event_id_only", r#"{"badge":true}"#, GATEWAY)
    );
    assert!(pusher.created > 0);
    let answer = tablet.ask("bob", ask_set("p2", set("tablet-token"))).await;
    assert_eq!(answer.status, pb::Status::Ok as i32, "{answer:?}");

    // The user sees the pushers of all its devices.
    let list = request("l1", pb::request::Kind::PusherList(pb::PusherList {}));
    assert_eq!(
        listed(&phone.ask("bob", list.clone()).await),
        [("bob-phone".into(), "phone-token".into()), ("bob-tablet".into(), "tablet-token".into())]
    );
    let remove = |pushkey: &str| {
        request("r1", pb::request::Kind::PusherRemove(pb::PusherRemove {
            app_id: "com.example.chat".into(),
            pushkey: pushkey.into(),
        }))
    };
    assert_eq!(listed(&phone.ask("bob", remove("tablet-token")).await), [("bob-tablet".into(), "tablet-token".into())]);
    assert_eq!(code(&phone.ask("bob", remove("tablet-token")).await), pb::ErrorCode::NotFound as i32);
    assert_eq!(listed(&tablet.ask("bob", list).await), [("bob-phone".into(), "phone-token".into())]);
}

/// Every field is bounded and checked; the URL must be one the operator allowed; content
/// only where allowed; a device holds at most `push.max_pushers_per_device`.
async fn pushers_are_checked_and_bounded(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.push.allowed_urls = vec![GATEWAY.into()];
        config.push.max_pushers_per_device = 2;
    })
    .await;
    let mut phone = device(&broker, "bob-phone", "bob").await;
    let refused = |change: fn(&mut pb::PusherSet)| {
        let mut pusher = set("token");
        change(&mut pusher);
        ask_set("bad", pusher)
    };
    let not_authorized = pb::ErrorCode::NotAuthorized as i32;
    let bad = pb::ErrorCode::BadRequest as i32;
    for (change, expected) in [
        (refused(|p| p.url = "http://127.0.0.1:9/elsewhere".into()), not_authorized),
        (refused(|p| p.url = "http://169.254.169.254/_matrix/push/v1/notify".into()), not_authorized),
        (refused(|p| p.format = "full".into()), not_authorized),
        (refused(|p| p.format = "rich".into()), bad),
        (refused(|p| p.app_id = String::new()), bad),
        (refused(|p| p.app_id = "a".repeat(65)), bad),
        (refused(|p| p.pushkey = "tok\u{0}en".into()), bad),
        (refused(|p| p.pushkey = "k".repeat(513)), bad),
        (refused(|p| p.lang = "en\r\nX".into()), bad),
        (refused(|p| p.data_json = "not json".into()), bad),
        (refused(|p| p.data_json = "[]".into()), bad),
    ] {
        let answer = phone.ask("bob", change).await;
        assert_eq!(code(&answer), expected, "{answer:?}");
        let told = answer.error.unwrap().message;
        assert!(!told.is_empty() && !told.chars().any(char::is_control), "{told:?}");
    }
    for pushkey in ["one", "two"] {
        assert_eq!(phone.ask("bob", ask_set("ok", set(pushkey))).await.status, pb::Status::Ok as i32);
    }
    // Setting one it holds again replaces it; a third is refused.
    assert_eq!(phone.ask("bob", ask_set("again", set("two"))).await.status, pb::Status::Ok as i32);
    let third = phone.ask("bob", ask_set("third", set("three"))).await;
    assert_eq!(code(&third), bad, "{third:?}");
    let list = request("l1", pb::request::Kind::PusherList(pb::PusherList {}));
    assert_eq!(listed(&phone.ask("bob", list).await).len(), 2);
}

/// A pushkey another user's device sets moves there (a phone that changed accounts): the
/// old user no longer has it. A forgotten device's pushers are gone.
async fn a_pushkey_moves_to_its_last_device_and_goes_with_a_forgotten_one(backend: TestBackend) {
    let broker = TestBroker::start_with_on(backend, |config| {
        config.push.allowed_urls = vec![GATEWAY.into()];
    })
    .await;
    let mut bob = device(&broker, "bob-phone", "bob").await;
    let mut carol = device(&broker, "carol-phone", "carol").await;
    assert_eq!(bob.ask("bob", ask_set("b", set("shared"))).await.status, pb::Status::Ok as i32);
    assert_eq!(carol.ask("carol", ask_set("c", set("shared"))).await.status, pb::Status::Ok as i32);
    let list = request("l", pb::request::Kind::PusherList(pb::PusherList {}));
    assert!(listed(&bob.ask("bob", list.clone()).await).is_empty());
    assert_eq!(listed(&carol.ask("carol", list.clone()).await), [("carol-phone".into(), "shared".into())]);
    // Bob cannot remove what is now carol's.
    let remove = request("r", pb::request::Kind::PusherRemove(pb::PusherRemove {
        app_id: "com.example.chat".into(),
        pushkey: "shared".into(),
    }));
    assert_eq!(code(&bob.ask("bob", remove).await), pb::ErrorCode::NotFound as i32);

    let mut laptop = device(&broker, "carol-laptop", "carol").await;
    assert_eq!(laptop.ask("carol", ask_set("l", set("laptop"))).await.status, pb::Status::Ok as i32);
    let forget = request("f", pb::request::Kind::DeviceForget(pb::DeviceForget { client_id: "carol-laptop".into() }));
    assert_eq!(carol.ask("carol", forget).await.status, pb::Status::Ok as i32);
    assert_eq!(listed(&carol.ask("carol", list).await), [("carol-phone".into(), "shared".into())]);
}
}

/// Without a gateway configured push is off, and says so.
#[tokio::test]
async fn without_gateways_push_is_off() {
    let broker = TestBroker::start().await;
    let mut phone = device(&broker, "bob-phone", "bob").await;
    let answer = phone.ask("bob", ask_set("p", set("token"))).await;
    assert_eq!(code(&answer), pb::ErrorCode::NotAuthorized as i32);
    assert!(answer.error.unwrap().message.contains("push is off"));
}
