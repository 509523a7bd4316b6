//! One rumqttd link per client id at a time. rumqttd 0.20 mishandles a new link whose client
//! id an old link still holds or just gave up: its router can free a connection id twice and
//! drop the newcomer, and a link that then fails leaves a stale will handler behind, on which
//! the next CONNECT of that client id panics while holding a lock — poisoning it, so that the
//! listener thread refuses every connection after (found by fuzzing the packet path). So the
//! hook layer does the session take-over itself: a new connection asks the old one of its
//! client id to end, and links to rumqttd only once the old link is closed on both sides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::EdgeError;

/// How long a new connection waits for the old one of its client id to close.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Slot {
    gate: Arc<Semaphore>,
    /// The connection that claimed the slot last, and how to ask it to end.
    owner: u64,
    kick: CancellationToken,
}

/// The client ids with a live (or closing) rumqttd link.
#[derive(Debug, Default)]
pub(crate) struct Links {
    slots: Mutex<HashMap<String, Slot>>,
}

/// A connection's right to link `client_id` to rumqttd; released when dropped.
#[derive(Debug)]
pub(crate) struct LinkClaim {
    links: Arc<Links>,
    client_id: String,
    owner: u64,
    /// Cancelled when a newer connection of the same client id takes over.
    pub(crate) kick: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Links {
    /// Takes the link of `client_id` over for connection `owner`: the connection holding it
    /// is asked to end, and this waits until it has.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        client_id: &str,
        owner: u64,
    ) -> Result<LinkClaim, EdgeError> {
        let kick = CancellationToken::new();
        let (gate, previous) = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| EdgeError::Protocol("link registry poisoned"))?;
            let slot = slots.entry(client_id.to_owned()).or_insert_with(|| Slot {
                gate: Arc::new(Semaphore::new(1)),
                owner,
                kick: CancellationToken::new(),
            });
            let previous = std::mem::replace(&mut slot.kick, kick.clone());
            slot.owner = owner;
            (Arc::clone(&slot.gate), previous)
        };
        previous.cancel();
        let permit = tokio::select! {
            permit = tokio::time::timeout(TAKE_OVER_WAIT, gate.acquire_owned()) => permit
                .map_err(|_| EdgeError::Timeout("the previous connection of this client id to close"))?
                .map_err(|_| EdgeError::Protocol("link gate closed"))?,
            // An even newer connection of the same client id came meanwhile.
            () = kick.cancelled() => return Err(EdgeError::Refused("taken over during CONNECT")),
        };
        Ok(LinkClaim {
            links: Arc::clone(self),
            client_id: client_id.to_owned(),
            owner,
            kick,
            _permit: permit,
        })
    }

    /// Claims `client_id` for `owner` only if no connection holds or wants it (nobody is
    /// asked to end): for the hook layer's own housekeeping of a session left behind.
    pub(crate) fn try_claim(self: &Arc<Self>, client_id: &str, owner: u64) -> Option<LinkClaim> {
        let mut slots = self.slots.lock().ok()?;
        if slots.contains_key(client_id) {
            return None;
        }
        let gate = Arc::new(Semaphore::new(1));
        let permit = Arc::clone(&gate).try_acquire_owned().ok()?;
        let kick = CancellationToken::new();
        let slot = Slot {
            gate,
            owner,
            kick: kick.clone(),
        };
        slots.insert(client_id.to_owned(), slot);
        Some(LinkClaim {
            links: Arc::clone(self),
            client_id: client_id.to_owned(),
            owner,
            kick,
            _permit: permit,
        })
    }
}

impl Drop for LinkClaim {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.links.slots.lock() {
            // Forget the client id unless a newer connection claimed it meanwhile.
            if slots
                .get(&self.client_id)
                .is_some_and(|s| s.owner == self.owner)
            {
                slots.remove(&self.client_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_claim_kicks_the_holder_and_waits_for_it() {
        let links = Arc::new(Links::default());
        let first = links.claim("phone", 1).await.unwrap();
        let contender = {
            let links = Arc::clone(&links);
            tokio::spawn(async move { links.claim("phone", 2).await.map(|c| c.owner) })
        };
        first.kick.cancelled().await;
        assert!(!contender.is_finished());
        drop(first);
        assert_eq!(contender.await.unwrap().unwrap(), 2);
        assert!(links.slots.lock().unwrap().is_empty());
        let other = links.claim("laptop", 3).await.unwrap();
        assert!(!other.kick.is_cancelled());
        assert!(links.try_claim("laptop", 4).is_none(), "held: not taken");
        drop(other);
        let housekeeping = links.try_claim("laptop", 4).unwrap();
        assert!(!housekeeping.kick.is_cancelled());
    }
}
