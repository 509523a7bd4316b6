//! Arrival order of one connection's chat messages. Each message's stages (decoding, the
//! membership check, the policy) may run concurrently with its neighbours', but it is handed
//! to the store only after the message that arrived before it was: the store assigns seqs in
//! the order messages are handed to it, so seqs follow arrival order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Hands out one [`Turn`] per chat message, in arrival order; one per connection.
#[derive(Debug)]
pub struct SendOrder {
    issued: u64,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    released: Mutex<Released>,
    /// The first turn not released yet; every turn below it is.
    first_held: watch::Sender<u64>,
}

/// Turns released before every earlier one was.
#[derive(Debug, Default)]
struct Released {
    first_held: u64,
    early: BTreeSet<u64>,
}

impl Default for SendOrder {
    fn default() -> Self {
        Self {
            issued: 0,
            shared: Arc::new(Shared {
                released: Mutex::default(),
                first_held: watch::Sender::new(0),
            }),
        }
    }
}

impl SendOrder {
    /// The turn of the message that arrived now, after every message handed out before.
    pub fn next_turn(&mut self) -> Turn {
        let number = self.issued;
        self.issued += 1;
        Turn {
            number,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// One message's place in its connection's order. Dropping it (the message reached the
/// store, or was refused) lets the messages after it go once every earlier one went too.
#[derive(Debug)]
pub struct Turn {
    number: u64,
    shared: Arc<Shared>,
}

impl Turn {
    /// Waits until every message that arrived before this one has reached the store or
    /// was refused.
    pub(super) async fn wait(&self) {
        let mut first_held = self.shared.first_held.subscribe();
        // Never fails: this turn keeps the sender alive.
        let _ = first_held.wait_for(|first| *first >= self.number).await;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Nothing panics under this lock; a poisoned one is still consistent.
        let mut released = self
            .shared
            .released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if released.first_held != self.number {
            released.early.insert(self.number);
            return;
        }
        let mut first = self.number + 1;
        while released.early.remove(&first) {
            first += 1;
        }
        released.first_held = first;
        self.shared.first_held.send_replace(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_waits_for_every_earlier_turn() {
        let mut order = SendOrder::default();
        let first = order.next_turn();
        let second = order.next_turn();
        let third = order.next_turn();
        let waiting = tokio::spawn(async move { third.wait().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(second);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the first turn is still held");
        drop(first);
        waiting.await.unwrap();
    }
}
