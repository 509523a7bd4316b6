//! The `postgres` provider against a users table of the team's own: bcrypt and argon2id
//! hashes, uid, superuser and topic rules from columns, rows cached (the password never),
//! and both outage modes when the database stalls.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use mqtt_im::config::{PostgresAuthSettings, PostgresSettings, ProviderOutage, ProviderSettings};

/// A users table in a schema of the test's own.
async fn users_table(pg: &PostgresSettings) -> String {
    let client = postgres_client(pg).await;
    let table = format!("{}.mqtt_users", pg.schema);
    let argon = mqtt_im::auth::hash::hash_password("root pw").unwrap();
    let bcrypt = bcrypt::hash("ann pw", 4).unwrap();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {table} (username text PRIMARY KEY, password_hash text NOT NULL,
                                   uid text, is_superuser boolean, acl jsonb);
             INSERT INTO {table} VALUES
               ('ann', '{bcrypt}', 'ann-uid', false, '{{\"all\": [\"fleet/ann/#\"]}}'),
               ('root', '{argon}', NULL, true, NULL);",
            schema = pg.schema
        ))
        .await
        .unwrap();
    table
}

fn provider(
    url: &str,
    table: &str,
    cache_ttl_ms: u64,
    on_error: ProviderOutage,
) -> ProviderSettings {
    ProviderSettings::Postgres(Box::new(PostgresAuthSettings {
        url: url.to_owned(),
        query: format!(
            "SELECT password_hash, uid, is_superuser, acl::text FROM {table} WHERE username = $1"
        ),
        pool_size: 2,
        timeout: mqtt_im::config::Period::millis(500),
        cache_ttl: mqtt_im::config::Period::millis(cache_ttl_ms),
        on_error,
    }))
}

async fn code(broker: &TestBroker, user: &str, password: &str) -> u8 {
    raw_connect(broker.addr, true, "probe", true, Some((user, password)))
        .await
        .code
}

fn postgres() -> Option<PostgresSettings> {
    match TestBackend::postgres() {
        Some(TestBackend::Postgres(pg)) => Some(pg),
        _ => {
            eprintln!("skipped: PostgreSQL not configured");
            None
        }
    }
}

#[tokio::test]
async fn the_teams_users_table_decides() {
    let Some(pg) = postgres() else { return };
    let table = users_table(&pg).await;
    let (url, cached_table) = (pg.url.clone(), table.clone());
    let broker = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(&url, &cached_table, 60_000, ProviderOutage::Deny),
            ProviderSettings::Users,
        ];
    })
    .await;
    let mut options = rumqttc::v5::MqttOptions::new("ann-phone", "127.0.0.1", broker.addr.port());
    options.set_credentials("ann", "ann pw");
    let mut ann = Client::v5_with(options).await;
    assert_eq!(
        ann.subscribe("im/u/ann-uid/#", 1).await,
        vec![1],
        "uid column"
    );
    assert_eq!(ann.publish_acked("fleet/ann/gps", b"1".to_vec()).await, 0);
    assert_eq!(
        ann.publish_acked("fleet/bob/gps", b"1".to_vec()).await,
        0x87,
        "acl column"
    );
    let mut options = rumqttc::v5::MqttOptions::new("root-1", "127.0.0.1", broker.addr.port());
    options.set_credentials("root", "root pw");
    let mut root = Client::v5_with(options).await;
    assert_eq!(
        root.publish_acked("fleet/bob/gps", b"1".to_vec()).await,
        0,
        "superuser"
    );
    assert_eq!(code(&broker, "ann", "wrong").await, 0x86);
    // Not in the table: the users table of the config decides.
    assert_eq!(code(&broker, "alice", "pw").await, 0);

    // Rows are cached: a deleted user still gets in until the row expires, with the right
    // password only.
    postgres_client(&pg)
        .await
        .batch_execute(&format!("DELETE FROM {table} WHERE username = 'ann'"))
        .await
        .unwrap();
    assert_eq!(code(&broker, "ann", "ann pw").await, 0);
    assert_eq!(code(&broker, "ann", "wrong").await, 0x86);
    let url = pg.url.clone();
    let uncached = TestBroker::start_with(move |c| {
        c.auth.providers = vec![provider(&url, &table, 0, ProviderOutage::Deny)];
    })
    .await;
    assert_eq!(code(&uncached, "ann", "ann pw").await, 0x86);
    assert_eq!(code(&uncached, "root", "root pw").await, 0);
}

#[tokio::test]
async fn a_stalled_database_follows_on_error() {
    let Some(pg) = postgres() else { return };
    let table = users_table(&pg).await;
    let Some((proxy, behind)) = postgres_behind_proxy().await else {
        return;
    };
    let (url, deny_table) = (behind.url.clone(), table.clone());
    let deny = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(&url, &deny_table, 0, ProviderOutage::Deny),
            ProviderSettings::Users,
        ];
    })
    .await;
    let url = behind.url.clone();
    let next = TestBroker::start_with(move |c| {
        c.auth.providers = vec![
            provider(&url, &table, 0, ProviderOutage::Next),
            ProviderSettings::Users,
        ];
    })
    .await;
    assert_eq!(code(&deny, "root", "root pw").await, 0);
    proxy.stall();
    assert_eq!(code(&deny, "root", "root pw").await, 0x88);
    assert_eq!(
        code(&deny, "alice", "pw").await,
        0x88,
        "deny: nobody gets past the outage"
    );
    assert_eq!(
        code(&next, "alice", "pw").await,
        0,
        "next: the users table decides"
    );
    proxy.up();
    eventually(|| async { code(&deny, "root", "root pw").await == 0 }).await;
}
