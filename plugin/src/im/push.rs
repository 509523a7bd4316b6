//! Offline push, the IM service's side. Owed notifications are claimed from the store's
//! queue (by one node of a cluster). Each one is skipped when a device of its user is
//! online anywhere, and otherwise sent to the gateways of the user's pushers with the badge
//! computed. A failed call is tried again later with the same event id; pushkeys a gateway
//! rejects are removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;

use super::inbox::rehydrate;
use super::ImService;
use crate::domain::{Conversation, Uid};
use crate::metrics::PushLabels;
use crate::policy::{Decision, PushView};
use crate::push::gateway::{Counts, DeviceTarget, GatewayError, Gateways, Notification};
use crate::store::{now_ms, Device, PushDue, PushTiming, Pusher};
use crate::text::LoggedId;
use crate::throttle::Throttle;
use crate::wire::pb;

/// Notifications claimed per round.
const PUSH_BATCH: usize = 64;
/// Notifications being sent at once.
const PUSH_CONCURRENCY: usize = 16;
/// The node id of a node without a cluster.
const ALONE: &str = "local";

/// What became of one owed notification.
enum Outcome {
    /// Sent to every gateway (or refused by one for good): handled.
    Done(&'static str),
    /// A gateway could not take it now: tried again later.
    Retry,
}

impl ImService {
    /// One round: claims due notifications and sends them.
    pub(super) async fn push_round(&self, gateways: &Gateways, failures: &Throttle) {
        let settings = &self.inner.push;
        let timeout = settings.timeout.0;
        let timing = PushTiming {
            now_ms: now_ms(),
            delay_ms: millis(settings.delay.0),
            coalesce_ms: millis(settings.coalesce.0),
            // Long enough for every gateway call of a round.
            lease_ms: millis(timeout * 4 + Duration::from_secs(10)),
        };
        let node = self.inner.cluster.as_ref().map_or(ALONE, |bus| bus.node());
        let claimed = self.inner.store.claim_pushes(node, timing, PUSH_BATCH);
        let due = match self.metrics().store_call("claim_pushes", claimed).await {
            Ok(due) => due,
            Err(e) => {
                if let Some(skipped) = failures.admit() {
                    tracing::warn!(error = %e, skipped, "push queue not read");
                }
                return;
            }
        };
        futures::stream::iter(due)
            .for_each_concurrent(PUSH_CONCURRENCY, |due| self.push_one(gateways, due))
            .await;
    }

    /// Drops the oldest owed notifications beyond `push.max_pending`.
    pub(super) async fn trim_pushes(&self) {
        let keep = self.inner.push.max_pending;
        let trimmed = self.inner.store.trim_push_queue(keep, now_ms());
        match self.metrics().store_call("trim_push_queue", trimmed).await {
            Ok(0) => {}
            Ok(dropped) => {
                self.count_push("dropped", dropped);
                tracing::warn!(
                    dropped,
                    keep,
                    "push queue full: the oldest notifications dropped"
                );
            }
            Err(e) => tracing::debug!(error = %e, "push queue not trimmed"),
        }
    }

    async fn push_one(&self, gateways: &Gateways, due: PushDue) {
        let store = &self.inner.store;
        let recorded = match self.deliver(gateways, &due).await {
            Outcome::Done(outcome) => {
                self.count_push(outcome, 1);
                // A skipped notification opens no coalescing window: the next message after
                // the user goes away is not held back.
                store.push_done(&due, now_ms(), outcome != "skipped").await
            }
            Outcome::Retry => {
                self.count_push("retried", 1);
                store
                    .push_failed(&due, now_ms() + retry_after(due.attempts))
                    .await
            }
        };
        if let Err(e) = recorded {
            // The claim runs out and the notification is sent again, with the same id.
            tracing::warn!(error = %e, uid = %due.uid, "push outcome not recorded");
        }
    }

    fn count_push(&self, outcome: &'static str, n: u64) {
        self.metrics()
            .pushes
            .get_or_create(&PushLabels { outcome })
            .inc_by(n);
    }

    async fn deliver(&self, gateways: &Gateways, due: &PushDue) -> Outcome {
        let online = self.devices_online_anywhere(&due.uid).await;
        // A message needs no notification while the user is at a screen; a new badge (after
        // a read, typically on that screen) still goes to the devices that are away.
        if due.conversation.is_some() && !online.is_empty() {
            return Outcome::Done("skipped");
        }
        let store = &self.inner.store;
        let (pushers, unread) = match tokio::try_join!(
            self.metrics()
                .store_call("pushers", store.pushers(&due.uid)),
            self.metrics()
                .store_call("unread_total", store.unread_total(&due.uid)),
        ) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "push not prepared: the store failed");
                return Outcome::Retry;
            }
        };
        let pushers: Vec<Pusher> = pushers
            .into_iter()
            .filter(|p| !online.contains(&p.device.client_id))
            .collect();
        if pushers.is_empty() {
            return Outcome::Done("skipped");
        }
        let message = match &due.conversation {
            Some(conversation) => self.pushed_message(conversation, due).await,
            None => None,
        };
        let mut targets = Vec::with_capacity(pushers.len());
        for pusher in &pushers {
            if let Some(shown) = self
                .push_policy(due, pusher, message.as_ref(), unread)
                .await
            {
                targets.push((pusher, shown));
            }
        }
        if targets.is_empty() {
            return Outcome::Done("skipped");
        }
        let mut outcome = Outcome::Done("sent");
        for ((url, format, shown), devices) in by_gateway(&targets) {
            let shown = message.as_ref().map(|m| Pushed {
                sender: m.sender.clone(),
                text: shown.unwrap_or_default().to_owned(),
            });
            let notification = notification(due, shown.as_ref(), format, unread, devices);
            let started = std::time::Instant::now();
            let answer = gateways.notify(url, &notification).await;
            self.metrics()
                .push_gateway_seconds
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Ok(rejected) => {
                    self.remove_rejected(&due.uid, &pushers, url, &rejected)
                        .await
                }
                Err(GatewayError::Refused(status)) => {
                    tracing::warn!(status, gateway = %LoggedId(url), "push refused by the gateway");
                    if matches!(outcome, Outcome::Done("sent")) {
                        outcome = Outcome::Done("failed");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, gateway = %LoggedId(url), "push not delivered yet");
                    outcome = Outcome::Retry;
                }
            }
        }
        outcome
    }

    /// What the policy's `on_push` makes of the notification for one pusher's device: `None`
    /// to skip it, or the text to show.
    async fn push_policy(
        &self,
        due: &PushDue,
        pusher: &Pusher,
        message: Option<&Pushed>,
        unread: u64,
    ) -> Option<Option<String>> {
        let text = message.map(|m| m.text.clone());
        if !self.inner.policy.checks_pushes() {
            return Some(text);
        }
        let view = PushView {
            uid: due.uid.to_string(),
            client_id: pusher.device.client_id.clone(),
            app_id: pusher.app_id.clone(),
            conversation: due
                .conversation
                .as_ref()
                .map(|c| c.name_for(&due.uid))
                .unwrap_or_default(),
            from: message.map(|m| m.sender.clone()),
            text: text.clone(),
            unread,
            format: pusher.format.clone(),
        };
        match self.inner.policy.on_push(view).await {
            Decision::Allow(Some(rewritten)) => Some(Some(rewritten)),
            Decision::Allow(None) => Some(text),
            Decision::Deny(reason) => {
                tracing::debug!(%reason, "push skipped by the policy");
                None
            }
        }
    }

    /// The client ids of `uid`'s devices holding an inbox subscription on any node (a
    /// Redis that cannot say adds none).
    async fn devices_online_anywhere(&self, uid: &Uid) -> HashSet<String> {
        let mut online: HashSet<String> = self.online_devices(uid).into_iter().collect();
        if let Some(bus) = &self.inner.cluster {
            if let Ok(elsewhere) = bus.locate(uid.as_str()).await {
                online.extend(elsewhere.into_keys());
            }
        }
        online
    }

    /// The message a notification is about (for pushers that show content).
    async fn pushed_message(&self, conversation: &Conversation, due: &PushDue) -> Option<Pushed> {
        let page = self
            .inner
            .store
            .history(conversation, Some(due.seq.saturating_add(1)), 1)
            .await
            .ok()?;
        let stored = page.messages.into_iter().find(|m| m.seq == due.seq)?;
        let chat = rehydrate(&stored);
        let text = match chat.msg.and_then(|content| content.kind) {
            Some(pb::content::Kind::Text(text)) => text,
            _ => String::new(),
        };
        Some(Pushed {
            sender: stored.sender.to_string(),
            text,
        })
    }

    /// Removes the pushers `url` rejected (the app must register again).
    async fn remove_rejected(&self, uid: &Uid, pushers: &[Pusher], url: &str, rejected: &[String]) {
        for pusher in pushers
            .iter()
            .filter(|p| p.url == url && rejected.contains(&p.pushkey))
        {
            let removed = self
                .inner
                .store
                .remove_pusher(uid, &pusher.app_id, &pusher.pushkey, "rejected")
                .await;
            match removed {
                Ok(_) => {
                    self.count_push("rejected", 1);
                    tracing::info!(
                        client_id = %LoggedId(&pusher.device.client_id),
                        app_id = %LoggedId(&pusher.app_id),
                        "pushkey rejected by its gateway: pusher removed"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "rejected pusher not removed"),
            }
        }
    }

    /// After a connect: nothing owed for what its digest shows.
    pub(super) fn push_cancelled_by_connect(&self, device: &Device) {
        if !self.inner.push.enabled() {
            return;
        }
        let (store, uid) = (Arc::clone(&self.inner.store), device.uid.clone());
        self.inner.tasks.spawn(async move {
            if let Err(e) = store.push_handled(&uid, None).await {
                tracing::debug!(error = %e, "push queue not cleared after a connect");
            }
        });
    }

    /// After a read: nothing owed for what was read; the pushers get the new badge.
    pub(super) async fn push_cancelled_by_read(
        &self,
        uid: &Uid,
        conversation: &Conversation,
        seq: u64,
    ) {
        if !self.inner.push.enabled() {
            return;
        }
        let handled = self
            .inner
            .store
            .push_handled(uid, Some((conversation, seq)));
        if let Err(e) = self.metrics().store_call("push_handled", handled).await {
            tracing::debug!(error = %e, "push queue not updated after a read");
        }
    }
}

/// What a content-showing pusher is told about the message.
struct Pushed {
    sender: String,
    text: String,
}

/// One call per gateway URL, format and text shown.
type GatewayCall<'a> = ((&'a str, &'a str, Option<&'a str>), Vec<DeviceTarget>);

/// The user's pushers (with the text each shows) grouped into gateway calls.
fn by_gateway<'a>(targets: &'a [(&'a Pusher, Option<String>)]) -> Vec<GatewayCall<'a>> {
    let mut groups: Vec<GatewayCall<'a>> = Vec::new();
    for (pusher, shown) in targets {
        let key = (
            pusher.url.as_str(),
            pusher.format.as_str(),
            shown.as_deref(),
        );
        let mut data = serde_json::from_str::<serde_json::Value>(&pusher.data_json)
            .ok()
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        data["format"] = serde_json::Value::String(pusher.format.clone());
        let device = DeviceTarget {
            app_id: pusher.app_id.clone(),
            pushkey: pusher.pushkey.clone(),
            pushkey_ts: pusher.created_ms / 1000,
            data,
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, devices)) => devices.push(device),
            None => groups.push((key, vec![device])),
        }
    }
    groups
}

fn notification(
    due: &PushDue,
    message: Option<&Pushed>,
    format: &str,
    unread: u64,
    devices: Vec<DeviceTarget>,
) -> Notification {
    let counts = Counts { unread };
    let Some(conversation) = &due.conversation else {
        // A read moved the badge: counts only.
        return Notification {
            event_id: None,
            room_id: None,
            kind: None,
            sender: None,
            content: None,
            prio: "low",
            counts,
            devices,
        };
    };
    let full = format == "full";
    let shown = message.filter(|_| full);
    Notification {
        event_id: Some(event_id(&due.uid, conversation, due.seq)),
        room_id: Some(conversation.name_for(&due.uid)),
        kind: shown.map(|_| "m.room.message".to_owned()),
        sender: shown.map(|m| m.sender.clone()),
        content: shown.map(|m| serde_json::json!({"msgtype": "m.text", "body": m.text})),
        prio: "high",
        counts,
        devices,
    }
}

/// The notification's id: the same for every retry of it, different for every user,
/// conversation and newest message.
fn event_id(uid: &Uid, conversation: &Conversation, seq: u64) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        uid.as_str().as_bytes(),
        conversation.key().as_bytes(),
        &seq.to_be_bytes(),
    ] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let digest = context.finish();
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("${hex}")
}

/// How long after its `attempts`-th failure a notification is tried again: 1 s doubling to
/// 5 minutes, jittered so that a gateway coming back is not hit by everything at once.
fn retry_after(attempts: u32) -> i64 {
    let ceiling = Duration::from_secs(1)
        .saturating_mul(1 << attempts.min(9))
        .min(Duration::from_secs(300));
    let jittered = ceiling.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
    millis(jittered)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::uid;

    #[test]
    fn an_event_id_is_stable_per_notification_and_differs_between_them() {
        let chat = Conversation::direct(&uid("a"), &uid("b"));
        let id = event_id(&uid("b"), &chat, 7);
        assert_eq!(id, event_id(&uid("b"), &chat, 7));
        assert_ne!(id, event_id(&uid("b"), &chat, 8));
        assert_ne!(id, event_id(&uid("a"), &chat, 7));
        assert!(id.starts_with('$') && id.len() == 33);
    }

    #[test]
    fn retries_back_off_to_five_minutes() {
        assert!((500..=1000).contains(&retry_after(0)));
        assert!((150_000..=300_000).contains(&retry_after(30)));
    }
}
