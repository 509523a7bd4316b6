//! Arrival order of one connection's chat messages. Each message's stages (decoding, the
//! membership check, the policy) may run concurrently with its neighbours', but it is handed
//! to the store only after the message that arrived before it was: the store assigns seqs in
//! the order messages are handed to it, so seqs follow arrival order.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Hands out one [`Turn`] per chat message, in arrival order; one per connection.
#[derive(Debug, Default)]
pub struct SendOrder {
    issued: u64,
    released: Arc<Mutex<Released>>,
}

/// Which turns are released; every turn below `first_held` is.
#[derive(Debug, Default)]
struct Released {
    first_held: u64,
    /// Released before every earlier turn was.
    early: BTreeSet<u64>,
    /// The turn waiting to become the first held one, woken when it does.
    waiting: HashMap<u64, oneshot::Sender<()>>,
}

impl SendOrder {
    /// The turn of the message that arrived now, after every message handed out before.
    pub fn next_turn(&mut self) -> Turn {
        let number = self.issued;
        self.issued += 1;
        Turn {
            number,
            released: Arc::clone(&self.released),
        }
    }
}

/// One message's place in its connection's order. Dropping it (the message reached the
/// store, or was refused) lets the messages after it go once every earlier one went too.
#[derive(Debug)]
pub struct Turn {
    number: u64,
    released: Arc<Mutex<Released>>,
}

impl Turn {
    fn lock(&self) -> MutexGuard<'_, Released> {
        // Nothing panics under this lock; a poisoned one is still consistent.
        self.released.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every message that arrived before this one has reached the store or
    /// was refused.
    pub(super) async fn wait(&self) {
        let woken = {
            let mut released = self.lock();
            if released.first_held >= self.number {
                return;
            }
            let (wake, woken) = oneshot::channel();
            released.waiting.insert(self.number, wake);
            woken
        };
        // Never fails while this turn is held: only its release drops the sender.
        let _ = woken.await;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let number = self.number;
        let mut released = self.lock();
        released.waiting.remove(&number);
        if released.first_held != number {
            released.early.insert(number);
            return;
        }
        let mut first = number + 1;
        while released.early.remove(&first) {
            first += 1;
        }
        released.first_held = first;
        if let Some(wake) = released.waiting.remove(&first) {
            let _ = wake.send(());
        }
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
