//! A terminal chat on the Rust SDK: sending with local echo, offline catch-up and read
//! receipts between two shells. With the broker running (README, first command):
//!
//! ```sh
//! cargo run --example chat -- --user alice --password alice-pw --peer bob   # shell 1
//! cargo run --example chat -- --user bob --password bob-pw --peer alice     # shell 2
//! ```
//!
//! Type a line to send it. Stop one side (Ctrl-D), send it a few lines from the other, start
//! it again: it shows its badge from the digest, catches up, and the sender sees "read".
//! Each user keeps its messages in `data/chat-{user}.db` (and resends what it could not
//! send before it stopped).

use std::sync::Arc;

use clap::Parser;
use mqtt_im_client::{
    Client, ClientOptions, ConnectionState, ConversationId, Delivery, Event, Message, SqliteStore,
};
use tokio::io::{AsyncBufReadExt, BufReader};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, Parser)]
struct Args {
    /// Your user id.
    #[arg(long)]
    user: String,
    /// Your password.
    #[arg(long)]
    password: String,
    /// Who you chat with.
    #[arg(long)]
    peer: String,
    /// The broker.
    #[arg(long, default_value = "mqtt://127.0.0.1:11883")]
    server: String,
}

fn show(message: &Message) {
    let text = message.content.text().unwrap_or("(media)");
    let seq = message
        .seq
        .map_or_else(|| "…".to_owned(), |s| s.to_string());
    println!("[{seq:>4}] {}: {text}", message.from);
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    std::fs::create_dir_all("data")?;
    let store = SqliteStore::open(format!("data/chat-{}.db", args.user))?;
    let server = ClientOptions::server_from_url(&args.server, None)?;
    let options = ClientOptions::new(server, &args.user, format!("{}-chat", args.user))
        .with_password(&args.password);
    let client = Client::start(options, Arc::new(store)).await?;
    let mut events = client.events();
    let chat = ConversationId::direct(&args.peer);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut view = View::default();
    println!("chat with {} (Ctrl-D to leave)", args.peer);
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(text) if !text.trim().is_empty() => {
                    client.send_text(&chat, text.trim()).await?;
                }
                Some(_) => {}
                None => break,
            },
            event = events.recv() => view.on_event(&client, &chat, event?).await?,
        }
    }
    client.close().await?;
    Ok(())
}

/// What the terminal has shown: messages up to a seq (digest previews and fetched pages
/// are shown once, in order, by the catch-up), and the newest seq of our own.
#[derive(Default)]
struct View {
    shown_up_to: u64,
    own_newest: u64,
    read_shown: u64,
}

impl View {
    async fn on_event(
        &mut self,
        client: &Client,
        chat: &ConversationId,
        event: Event,
    ) -> Result<(), Error> {
        match event {
            Event::Connection(ConnectionState::Online) => self.catch_up(client, chat).await?,
            Event::Connection(ConnectionState::Offline { reason }) => {
                println!("-- offline ({reason}); reconnecting");
            }
            Event::Message(message) if &message.conversation == chat => {
                let seq = message.seq.unwrap_or(0);
                if message.delivery == Delivery::Received && seq > self.shown_up_to {
                    show(&message);
                    self.shown_up_to = seq;
                    client.mark_read(chat, seq).await?;
                }
            }
            Event::Updated(message) if &message.conversation == chat => match &message.delivery {
                Delivery::Sent => {
                    let seq = message.seq.unwrap_or(0);
                    self.own_newest = self.own_newest.max(seq);
                    println!("       ✓ sent (seq {seq})");
                }
                Delivery::Sending {
                    error: Some(error), ..
                } => println!("       … retrying: {error}"),
                Delivery::Failed { reason, .. } => println!("       ✗ not sent: {reason}"),
                _ => {}
            },
            Event::Read {
                conversation,
                uid,
                read_seq,
            } if &conversation == chat
                && read_seq >= self.own_newest
                && self.own_newest > self.read_shown =>
            {
                self.read_shown = self.own_newest;
                println!("       ✓✓ read by {uid}");
            }
            Event::Missed { count, .. } => println!("-- {count} older messages skipped by a cap"),
            _ => {}
        }
        Ok(())
    }

    /// After each connect: the badges the digest brought, then what is new in the
    /// conversation (fetched until the server has nothing older for this device).
    async fn catch_up(&mut self, client: &Client, chat: &ConversationId) -> Result<(), Error> {
        let unread = client.unread().await?;
        println!("-- online; {} unread in all", unread.total);
        while !client.fetch_older(chat, 50).await?.end {}
        let mut recent = client.messages(chat, None, 20).await?;
        recent.reverse();
        for message in recent
            .iter()
            .filter(|m| m.seq.unwrap_or(0) > self.shown_up_to)
        {
            show(message);
        }
        for message in &recent {
            let seq = message.seq.unwrap_or(0);
            self.shown_up_to = self.shown_up_to.max(seq);
            if message.from == client.uid() {
                self.own_newest = self.own_newest.max(seq);
            }
        }
        if self.shown_up_to > 0 {
            client.mark_read(chat, self.shown_up_to).await?;
        }
        Ok(())
    }
}
