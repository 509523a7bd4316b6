//! Everything in memory: for tests and tools that need no persistence.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{ConversationRecord, LocalStore, OutboxItem, StoreError};
use crate::model::{ConversationId, Message};

/// A store that forgets everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    owner: Option<String>,
    conversations: BTreeMap<ConversationId, ConversationRecord>,
    /// Per conversation, in insertion order.
    messages: HashMap<ConversationId, Vec<Message>>,
    /// (sender, msg_id) -> conversation.
    index: HashMap<(String, String), ConversationId>,
    outbox: Vec<OutboxItem>,
    readers: BTreeMap<(ConversationId, String), u64>,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics under the lock; a poisoned one is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn find(&mut self, from: &str, msg_id: &str) -> Option<&mut Message> {
        let conversation = self.index.get(&(from.to_owned(), msg_id.to_owned()))?;
        self.messages
            .get_mut(conversation)?
            .iter_mut()
            .find(|m| m.from == from && m.msg_id == msg_id)
    }

    fn add(&mut self, message: &Message) -> bool {
        let key = (message.from.clone(), message.msg_id.clone());
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key, message.conversation.clone());
        self.messages
            .entry(message.conversation.clone())
            .or_default()
            .push(message.clone());
        true
    }
}

impl LocalStore for MemoryStore {
    fn bind_user(&self, uid: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        match &state.owner {
            Some(owner) if owner != uid => Err(StoreError::OtherUser {
                owner: owner.clone(),
                uid: uid.to_owned(),
            }),
            _ => {
                state.owner = Some(uid.to_owned());
                Ok(())
            }
        }
    }

    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationRecord>, StoreError> {
        Ok(self.lock().conversations.get(id).cloned())
    }

    fn conversations(&self) -> Result<Vec<ConversationRecord>, StoreError> {
        Ok(self.lock().conversations.values().cloned().collect())
    }

    fn insert_all(
        &self,
        batch: &[(ConversationRecord, Vec<Message>)],
    ) -> Result<Vec<Vec<bool>>, StoreError> {
        let mut state = self.lock();
        let new = batch
            .iter()
            .map(|(conversation, messages)| {
                state
                    .conversations
                    .insert(conversation.id.clone(), conversation.clone());
                messages.iter().map(|m| state.add(m)).collect()
            })
            .collect();
        Ok(new)
    }

    fn enqueue(&self, message: &Message, item: &OutboxItem) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.add(message);
        state.outbox.push(item.clone());
        Ok(())
    }

    fn update(
        &self,
        message: &Message,
        done: Option<&ConversationRecord>,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(stored) = state.find(&message.from, &message.msg_id) {
            *stored = message.clone();
        }
        if let Some(conversation) = done {
            state.outbox.retain(|item| item.msg_id != message.msg_id);
            state
                .conversations
                .insert(conversation.id.clone(), conversation.clone());
        }
        Ok(())
    }

    fn message(&self, from: &str, msg_id: &str) -> Result<Option<Message>, StoreError> {
        Ok(self.lock().find(from, msg_id).cloned())
    }

    fn messages(
        &self,
        conversation: &ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let state = self.lock();
        let Some(all) = state.messages.get(conversation) else {
            return Ok(Vec::new());
        };
        let mut sending: Vec<&Message> = Vec::new();
        let mut stored: Vec<&Message> = Vec::new();
        for message in all {
            match message.seq {
                Some(seq) if before.is_none_or(|b| seq < b) => stored.push(message),
                None if before.is_none() => sending.push(message),
                _ => {}
            }
        }
        sending.reverse();
        stored.sort_by_key(|m| std::cmp::Reverse(m.seq));
        Ok(sending
            .into_iter()
            .chain(stored)
            .take(limit)
            .cloned()
            .collect())
    }

    fn count_from(
        &self,
        conversation: &ConversationId,
        uid: &str,
        after: u64,
    ) -> Result<u64, StoreError> {
        let state = self.lock();
        Ok(state.messages.get(conversation).map_or(0, |all| {
            all.iter()
                .filter(|m| m.from == uid && m.seq.is_some_and(|s| s > after))
                .count() as u64
        }))
    }

    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.lock().outbox.clone())
    }

    fn set_reader(
        &self,
        conversation: &ConversationId,
        uid: &str,
        read_seq: u64,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let cursor = state
            .readers
            .entry((conversation.clone(), uid.to_owned()))
            .or_default();
        *cursor = (*cursor).max(read_seq);
        Ok(())
    }

    fn readers(&self, conversation: &ConversationId) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .lock()
            .readers
            .iter()
            .filter(|((c, _), _)| c == conversation)
            .map(|((_, uid), seq)| (uid.clone(), *seq))
            .collect())
    }
}
