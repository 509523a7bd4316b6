//! Walk-through on the Rust SDK (`mqtt-im-client`) against a running mqtt-im (see README):
//! alice sends bob three messages while bob is offline; bob's device starts, its badge comes
//! from the digest (no backlog is pushed), it fetches the backlog page by page (each Pull
//! acknowledging the page before it) and marks it read; alice sees the read receipt.
//!
//! `cargo run --example walkthrough` (address from MQTT_IM_ADDR, default 127.0.0.1:11883).

use std::sync::Arc;

use mqtt_im_client::{
    Client, ClientOptions, ConnectionState, ConversationId, Delivery, Event, MemoryStore,
};

type Error = Box<dyn std::error::Error>;

async fn start(uid: &str, password: &str) -> Result<Client, Error> {
    let addr = std::env::var("MQTT_IM_ADDR").unwrap_or_else(|_| "127.0.0.1:11883".into());
    let server = ClientOptions::server_from_url(&format!("mqtt://{addr}"), None)?;
    let device = format!("{uid}-walkthrough-{}", std::process::id());
    let options = ClientOptions::new(server, uid, device).with_password(password);
    Ok(Client::start(options, Arc::new(MemoryStore::default())).await?)
}

/// Waits (up to 10 s) for the first event `pick` accepts.
async fn until<T>(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> Result<T, Error> {
    let wait = async {
        loop {
            if let Some(found) = pick(events.recv().await?) {
                return Ok::<T, Error>(found);
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), wait).await?
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let alice = start("alice", "alice-pw").await?;
    let bob_chat = ConversationId::direct("bob");
    let mut sent = 0;
    let mut alice_events = alice.events();
    for i in 1..=3 {
        alice
            .send_text(&bob_chat, format!("hello bob #{i}"))
            .await?;
    }
    until(&mut alice_events, |e| match e {
        Event::Updated(m) if m.delivery == Delivery::Sent => {
            sent += 1;
            (sent == 3).then_some(())
        }
        _ => None,
    })
    .await?;
    println!("alice: 3 messages stored by the server while bob is offline");

    let bob = start("bob", "bob-pw").await?;
    let mut bob_events = bob.events();
    until(&mut bob_events, |e| {
        (e == Event::Connection(ConnectionState::Online)).then_some(())
    })
    .await?;
    let alice_chat = ConversationId::direct("alice");
    let unread = bob.unread().await?;
    println!("bob: digest says {} unread", unread.total);
    while !bob.fetch_older(&alice_chat, 2).await?.end {}
    let mut history = bob.messages(&alice_chat, None, 100).await?;
    history.reverse();
    for message in &history {
        let text = message.content.text().unwrap_or("(media)");
        println!("bob: seq {:?} from {}: {text}", message.seq, message.from);
    }
    if let Some(newest) = history.last().and_then(|m| m.seq) {
        bob.mark_read(&alice_chat, newest).await?;
        println!(
            "bob: read up to seq {newest}; unread now {}",
            bob.unread().await?.total
        );
        let (reader, read_seq) = until(&mut alice_events, |e| match e {
            Event::Read { uid, read_seq, .. } if read_seq >= newest => Some((uid, read_seq)),
            _ => None,
        })
        .await?;
        println!("alice: {reader} has read up to seq {read_seq}");
    }
    alice.close().await?;
    bob.close().await?;
    Ok(())
}
