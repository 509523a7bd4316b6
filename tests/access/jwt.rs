//! The `jwt` provider over real connections: HS256 tokens in the password with the uid and
//! topic rules in claims, every refusal (`exp`, `nbf`, `iss`, `aud`, signature), a
//! non-JWT password passed on to the users table, the connection closed when the token
//! expires (MQTT 5 DISCONNECT 0xA0), and ES256 keys from a JWKS file that is rotated.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use mqtt_im::config::{JwtSettings, ProviderSettings};
use serde_json::{json, Value};

const SECRET: &str = "a shared secret of the identity service";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn settings(algorithm: &str) -> JwtSettings {
    JwtSettings {
        from: Default::default(),
        algorithm: algorithm.into(),
        secret: None,
        public_key: None,
        jwks_file: None,
        issuer: Some("https://id.example".into()),
        audience: Some("mqtt".into()),
        uid_claim: "sub".into(),
        acl_claim: Some("acl".into()),
        superuser_claim: None,
        leeway: mqtt_im::config::Period::default(),
    }
}

async fn connack(broker: &TestBroker, v5: bool, user: &str, token: &str) -> u8 {
    raw_connect(broker.addr, v5, "jwt-probe", true, Some((user, token)))
        .await
        .code
}

/// As phones usually do: the username is the user, the password the token.
fn v5_options(broker: &TestBroker, client_id: &str, token: &str) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", broker.addr.port());
    options.set_credentials("ann", token);
    options
}

#[tokio::test]
async fn hs256_tokens_name_the_uid_and_carry_topic_rules() {
    let broker = TestBroker::start_with(|c| {
        let mut jwt = settings("HS256");
        jwt.secret = Some(SECRET.into());
        c.auth.providers = vec![
            ProviderSettings::Jwt(Box::new(jwt)),
            ProviderSettings::Users,
        ];
    })
    .await;
    let claims = |extra: Value| {
        let mut claims = json!({
            "sub": "ann", "iss": "https://id.example", "aud": "mqtt", "exp": now() + 300,
            "acl": {"pub": ["fleet/%u/#"], "sub": ["fleet/#"], "deny": ["fleet/secret"]},
        });
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        claims
    };
    let good = hs256(&claims(json!({})));
    let mut ann = Client::v5_with(v5_options(&broker, "ann-phone", &good)).await;
    assert_eq!(
        ann.subscribe("im/u/ann/#", 1).await,
        vec![1],
        "the uid is the sub claim"
    );
    let _ = ann.digest("ann").await;
    assert_eq!(ann.subscribe("fleet/#", 1).await, vec![1]);
    assert_eq!(ann.subscribe("other/#", 1).await, vec![0x87]);
    assert_eq!(ann.publish_acked("fleet/ann/gps", b"1".to_vec()).await, 0);
    assert_eq!(ann.next_on("fleet/ann/gps").await, b"1".to_vec());
    assert_eq!(
        ann.publish_acked("fleet/bob/gps", b"x".to_vec()).await,
        0x87
    );

    for (why, token) in [
        ("expired", hs256(&claims(json!({"exp": now() - 10})))),
        ("not yet valid", hs256(&claims(json!({"nbf": now() + 600})))),
        (
            "wrong issuer",
            hs256(&claims(json!({"iss": "https://evil.example"}))),
        ),
        ("wrong audience", hs256(&claims(json!({"aud": "web"})))),
        ("no exp", {
            let mut c = claims(json!({}));
            c.as_object_mut().unwrap().remove("exp");
            hs256(&c)
        }),
        ("forged signature", {
            let key = EncodingKey::from_secret(b"guessed");
            encode(&Header::new(Algorithm::HS256), &claims(json!({})), &key).unwrap()
        }),
    ] {
        assert_eq!(connack(&broker, true, "x", &token).await, 0x86, "{why}");
        assert_eq!(connack(&broker, false, "x", &token).await, 4, "{why}");
    }
    // Not a JWT: the next provider (the users table) decides.
    assert_eq!(connack(&broker, true, "alice", "pw").await, 0);
    assert_eq!(connack(&broker, true, "alice", "nope").await, 0x86);
}

#[tokio::test]
async fn the_connection_ends_when_the_token_expires() {
    let broker = TestBroker::start_with(|c| {
        let mut jwt = settings("HS256");
        jwt.secret = Some(SECRET.into());
        c.auth.providers = vec![ProviderSettings::Jwt(Box::new(jwt))];
    })
    .await;
    let token = hs256(&json!({
        "sub": "ann", "iss": "https://id.example", "aud": "mqtt", "exp": now() + 2,
    }));
    let mut ann = Client::v5_with(v5_options(&broker, "ann-phone", &token)).await;
    assert_eq!(ann.subscribe("plain/#", 1).await, vec![1]);
    assert_eq!(ann.disconnect_reason().await, 0xA0);
}

/// An ES256 key pair and its public JWK under `kid`.
fn es256_key(kid: &str) -> (EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw();
    let (x, y) = point[1..].split_at(32);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    });
    (
        EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk,
    )
}

fn es256(key: &EncodingKey, kid: &str, sub: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    let claims =
        json!({"sub": sub, "iss": "https://id.example", "aud": "mqtt", "exp": now() + 300});
    encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn es256_keys_come_from_a_jwks_file_that_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let (old_key, old_jwk) = es256_key("2026-11");
    let (new_key, new_jwk) = es256_key("2026-12");
    std::fs::write(&jwks, json!({"keys": [old_jwk]}).to_string()).unwrap();
    let path = jwks.clone();
    let broker = TestBroker::start_with(move |c| {
        let mut jwt = settings("ES256");
        jwt.jwks_file = Some(path);
        c.auth.providers = vec![ProviderSettings::Jwt(Box::new(jwt))];
        c.auth.reload_interval = mqtt_im::config::Period::millis(50);
    })
    .await;
    assert_eq!(
        connack(&broker, true, "x", &es256(&old_key, "2026-11", "ann")).await,
        0
    );
    assert_eq!(
        connack(&broker, true, "x", &es256(&new_key, "2026-12", "ann")).await,
        0x86
    );
    std::fs::write(&jwks, json!({"keys": [new_jwk]}).to_string()).unwrap();
    let rotated =
        || async { connack(&broker, true, "x", &es256(&new_key, "2026-12", "ann")).await == 0 };
    eventually(rotated).await;
    assert_eq!(
        connack(&broker, true, "x", &es256(&old_key, "2026-11", "ann")).await,
        0x86
    );
}

/// RS256 with the identity service's PEM public key (a throw-away key pair kept as a test
/// fixture); a token signed by another key is refused.
#[tokio::test]
async fn rs256_tokens_checked_with_a_pem_public_key() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public = fixtures.join("jwt-rs256-public.pem");
    let broker = TestBroker::start_with(move |c| {
        let mut jwt = settings("RS256");
        jwt.public_key = Some(public);
        c.auth.providers = vec![ProviderSettings::Jwt(Box::new(jwt))];
    })
    .await;
    let private = std::fs::read(fixtures.join("jwt-rs256-private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let claims =
        json!({"sub": "ann", "iss": "https://id.example", "aud": "mqtt", "exp": now() + 300});
    let token = encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    assert_eq!(connack(&broker, true, "ann", &token).await, 0);
    let (other, _) = es256_key("other");
    let forged = encode(&Header::new(Algorithm::ES256), &claims, &other).unwrap();
    assert_eq!(connack(&broker, true, "ann", &forged).await, 0x86);
}
