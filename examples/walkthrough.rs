//! Walk-through against a running mqtt-im (see README): alice sends bob three messages while
//! bob is offline; bob connects, reads the digest, clears its counters and pulls the backlog
//! page by page, each Pull acknowledging the page before it.
//!
//! `cargo run --example walkthrough` (address from MQTT_IM_ADDR, default 127.0.0.1:11883).
//!
//! A publish the server cannot store now (its database is down) gets MQTT 5 PUBACK 0x80; an
//! MQTT 3.1.1 connection gets an error on `resp` and is closed, and an event loop that keeps
//! polling reconnects and retransmits it (rumqttc: into a `clean_session = false` session).

use std::time::Duration;

use mqtt_im::wire::pb;
use prost::Message;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

type Error = Box<dyn std::error::Error>;

fn connect(client_id: &str, user: &str, password: &str) -> Result<(AsyncClient, EventLoop), Error> {
    let addr = std::env::var("MQTT_IM_ADDR").unwrap_or_else(|_| "127.0.0.1:11883".into());
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("MQTT_IM_ADDR must be host:port")?;
    let mut options = MqttOptions::new(client_id, host, port.parse()?);
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(30));
    Ok(AsyncClient::new(options, 100))
}

/// Polls until a publish on `topic` arrives.
async fn next_on(events: &mut EventLoop, topic: &str) -> Result<Vec<u8>, Error> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll()).await??;
        if let Event::Incoming(Packet::Publish(publish)) = event {
            if publish.topic == topic {
                return Ok(publish.payload.to_vec());
            }
        }
    }
}

/// Polls until `n` PUBACKs arrived (the messages are then stored).
async fn acks(events: &mut EventLoop, mut n: usize) -> Result<(), Error> {
    while n > 0 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll()).await??;
        if let Event::Incoming(Packet::PubAck(_)) = event {
            n -= 1;
        }
    }
    Ok(())
}

async fn ask(
    client: &AsyncClient,
    events: &mut EventLoop,
    kind: pb::request::Kind,
) -> Result<pb::Response, Error> {
    let request = pb::Request {
        request_id: "walkthrough".into(),
        kind: Some(kind),
    };
    client
        .publish(
            "im/u/bob/req",
            QoS::AtLeastOnce,
            false,
            request.encode_to_vec(),
        )
        .await?;
    Ok(pb::Response::decode(
        next_on(events, "im/u/bob/resp").await?.as_slice(),
    )?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let run = std::process::id();
    let (alice, mut alice_events) = connect("alice-walkthrough", "alice", "alice-pw")?;
    for i in 1..=3 {
        let text = format!("hello bob #{i}");
        alice
            .publish(
                "im/u/bob",
                QoS::AtLeastOnce,
                false,
                pb::Envelope::text(format!("{run}-{i}"), "bob", text).encode_to_vec(),
            )
            .await?;
    }
    acks(&mut alice_events, 3).await?;
    println!("alice: 3 messages stored (PUBACKed) while bob is offline");

    let (bob, mut bob_events) = connect("bob-walkthrough", "bob", "bob-pw")?;
    bob.subscribe("im/u/bob/#", QoS::AtLeastOnce).await?;
    let digest = pb::Digest::decode(
        next_on(&mut bob_events, "im/u/bob/digest")
            .await?
            .as_slice(),
    )?;
    for (conversation, session) in &digest.sessions {
        println!(
            "bob: digest v{}: {conversation}: {} new, {} unacked, newest seq {}",
            digest.version, session.count, session.unacked, session.max_seq
        );
    }
    let clear = pb::request::Kind::ClearCounters(pb::ClearCounters {
        version: digest.version,
    });
    ask(&bob, &mut bob_events, clear).await?;
    println!("bob: badge counters cleared for digest v{}", digest.version);

    let mut ack = None;
    loop {
        let pull = pb::request::Kind::Pull(pb::Pull {
            conversation: "u/alice".into(),
            page_size: 2,
            ack,
        });
        let response = ask(&bob, &mut bob_events, pull).await?;
        let Some(pb::response::Result::Page(page)) = response.result else {
            return Err(format!("pull failed: {:?}", response.error).into());
        };
        for message in &page.messages {
            if let Some(pb::content::Kind::Text(text)) =
                message.msg.as_ref().and_then(|c| c.kind.as_ref())
            {
                println!("bob: seq {} from {}: {text}", message.seq, message.from);
            }
        }
        if page.messages.is_empty() && page.end {
            println!("bob: end of backlog; everything acknowledged");
            break;
        }
        ack = page.cursor;
    }
    alice.disconnect().await?;
    bob.disconnect().await?;
    Ok(())
}
