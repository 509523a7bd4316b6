//! The behaviour every backend must show, run against each of them: every method of
//! [`Store`], its results and its documented errors.

use crate::domain::Uid;
use std::sync::{Arc, Mutex};

use super::{
    Collected, Conversation, Cutoffs, Device, DigestShape, GroupErasure, NewMessage, Role,
    SeqRange, Store, StoreError,
};

/// Runs every check against one store (each uses its own conversations and users), then
/// closes it.
pub(crate) async fn run_all(store: &dyn Store) {
    seqs_are_gap_free_and_duplicates_absorbed(store).await;
    queued_appends_commit_in_queue_order(store).await;
    pages_walk_holes_and_end(store).await;
    acks_are_clamped_and_checked(store).await;
    new_device_inherits_acks(store).await;
    digest_counts_and_clear_by_version(store).await;
    fitted_digest_records_only_what_it_kept(store).await;
    digests_of_many_devices_come_in_request_order(store).await;
    history_and_read_cursor(store).await;
    a_read_on_another_device_is_in_the_next_digest(store).await;
    groups_roles_and_membership(store).await;
    removals_are_logged_in_order(store).await;
    receipts_and_senders(store).await;
    sizes_count_what_was_written(store).await;
    retention_deletes_a_prefix_that_pulls_report(store).await;
    backlog_cap_skips_the_oldest_and_reports_them(store).await;
    devices_are_listed_expired_and_forgotten(store).await;
    erasing_a_user_removes_its_traces(store).await;
    retained_messages_are_replaced_and_removed(store).await;
    pushers_are_unique_per_key_bounded_per_device_and_forgotten_with_it(store).await;
    the_push_queue_delays_coalesces_retries_and_cancels(store).await;
    closed_store_refuses_calls(store).await;
}

fn uid(text: &str) -> Uid {
    Uid::parse(text).unwrap()
}

fn uids(list: &[&str]) -> Vec<Uid> {
    list.iter().map(|text| uid(text)).collect()
}

fn device(user: &str, client_id: &str) -> Device {
    Device {
        uid: uid(user),
        client_id: client_id.into(),
    }
}

fn direct(a: &str, b: &str) -> Conversation {
    Conversation::direct(&uid(a), &uid(b))
}

fn group(gid: &str) -> Conversation {
    Conversation::group(&crate::domain::Gid::parse(gid).unwrap())
}

pub(crate) fn message(conversation: &Conversation, sender: &str, msg_id: &str) -> NewMessage {
    NewMessage {
        conversation: conversation.clone(),
        sender: uid(sender),
        sender_device: format!("{sender}-phone"),
        msg_id: msg_id.into(),
        server_time: 1_000,
        body: msg_id.as_bytes().to_vec(),
    }
}

/// Appends `n` messages from `sender`.
pub(crate) async fn append_n(store: &dyn Store, conversation: &Conversation, sender: &str, n: u64) {
    for i in 0..n {
        let id = format!("{conversation}-{sender}-{i}");
        store
            .append(message(conversation, sender, &id))
            .await
            .unwrap();
    }
}

fn seqs(page: &super::Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

async fn seqs_are_gap_free_and_duplicates_absorbed(store: &dyn Store) {
    let chat = direct("s1", "s2");
    let first = store.append(message(&chat, "s1", "m1")).await.unwrap();
    let second = store.append(message(&chat, "s2", "m1")).await.unwrap();
    let again = store.append(message(&chat, "s1", "m1")).await.unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert!(again.duplicate);
    assert_eq!(again.seq, 1);
    let all = store.history(&chat, None, 10).await.unwrap();
    assert_eq!(seqs(&all), vec![2, 1]);
    // The two users of a 1:1 chat are its members from its first message on.
    let members: Vec<Uid> = store
        .members(&chat)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(members, uids(&["s1", "s2"]));
}

/// Appends queued one after another get increasing seqs, and their commit hooks run in seq
/// order before the appends resolve; a duplicate's hook sees the first copy's seq.
async fn queued_appends_commit_in_queue_order(store: &dyn Store) {
    let chat = direct("q1", "q2");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut queued = Vec::new();
    for i in 0..50 {
        let seen = Arc::clone(&seen);
        let hook: super::OnCommit = Box::new(move |appended| {
            seen.lock()
                .unwrap()
                .push((appended.seq, appended.duplicate));
        });
        let id = format!("q-{i}");
        queued.push(
            store
                .queue_append(message(&chat, "q1", &id), Some(hook))
                .await
                .unwrap(),
        );
    }
    let duplicate = store
        .queue_append(message(&chat, "q1", "q-7"), None)
        .await
        .unwrap();
    let mut committed = Vec::new();
    for queued in queued {
        committed.push(queued.committed().await.unwrap().seq);
    }
    assert_eq!(committed, (1..=50).collect::<Vec<u64>>());
    let hooks = seen.lock().unwrap().clone();
    assert_eq!(hooks, (1..=50).map(|seq| (seq, false)).collect::<Vec<_>>());
    let duplicate = duplicate.committed().await.unwrap();
    assert_eq!((duplicate.seq, duplicate.duplicate), (8, true));
}

async fn pages_walk_holes_and_end(store: &dyn Store) {
    let chat = direct("p1", "p2");
    append_n(store, &chat, "p1", 100).await;
    let reader = device("p2", "phone");
    store.register_device(&reader).await.unwrap();
    let newest = store.pull(&reader, &chat, None, 20).await.unwrap();
    assert_eq!(seqs(&newest).first(), Some(&100));
    assert_eq!(seqs(&newest).last(), Some(&81));
    assert!(!newest.end);
    // Acknowledge the newest 20 and stop; new messages arrive; the rest is still there.
    store
        .ack(&reader, &chat, SeqRange { lo: 81, hi: 100 })
        .await
        .unwrap();
    store.append(message(&chat, "p1", "late")).await.unwrap();
    let next = store.pull(&reader, &chat, None, 20).await.unwrap();
    assert_eq!(seqs(&next)[..2], [101, 80]);
    let mut seen = seqs(&next);
    let mut cursor = SeqRange::new(*seen.last().unwrap(), seen[0]);
    loop {
        let page = store.pull(&reader, &chat, cursor, 30).await.unwrap();
        seen.extend(seqs(&page));
        if page.messages.is_empty() {
            assert!(page.end);
            break;
        }
        cursor = SeqRange::new(page.messages.last().unwrap().seq, page.messages[0].seq);
    }
    let mut expected: Vec<u64> = (1..=80).rev().collect();
    expected.insert(0, 101);
    assert_eq!(seen, expected);
    // The sending device never gets its own messages back.
    let sender = device("p1", "p1-phone");
    store.register_device(&sender).await.unwrap();
    let own = store.pull(&sender, &chat, None, 10).await.unwrap();
    assert!(own.messages.is_empty() && own.end);
    // A conversation nobody wrote to: nothing to pull, and an ack cursor cannot be valid.
    let empty = direct("p1", "p3");
    let page = store.pull(&reader, &empty, None, 10).await.unwrap();
    assert!(page.messages.is_empty() && page.end);
    let cursor = SeqRange::new(1, 2);
    let acked = store.pull(&reader, &empty, cursor, 10).await;
    assert!(matches!(acked, Err(StoreError::Invalid(_))), "{acked:?}");
}

/// `ack` returns the last seq it acknowledged (clamped to the conversation's last seq).
async fn acks_are_clamped_and_checked(store: &dyn Store) {
    let chat = direct("k1", "k2");
    append_n(store, &chat, "k1", 5).await;
    let reader = device("k2", "phone");
    store.register_device(&reader).await.unwrap();
    let acked = store.ack(&reader, &chat, SeqRange { lo: 1, hi: 3 }).await;
    assert_eq!(acked.unwrap(), 3);
    let clamped = store.ack(&reader, &chat, SeqRange { lo: 1, hi: 99 }).await;
    assert_eq!(clamped.unwrap(), 5);
    let past = store
        .ack(&reader, &chat, SeqRange { lo: 500, hi: 501 })
        .await;
    assert!(matches!(past, Err(StoreError::Invalid(_))), "{past:?}");
    let nobody = store
        .ack(&reader, &direct("k2", "k9"), SeqRange { lo: 1, hi: 1 })
        .await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))), "{nobody:?}");
    let page = store.pull(&reader, &chat, None, 10).await.unwrap();
    assert!(page.messages.is_empty() && page.end);
}

async fn new_device_inherits_acks(store: &dyn Store) {
    let chat = direct("n1", "n2");
    append_n(store, &chat, "n1", 10).await;
    let phone = device("n2", "phone");
    store.register_device(&phone).await.unwrap();
    store
        .ack(&phone, &chat, SeqRange { lo: 1, hi: 6 })
        .await
        .unwrap();
    let laptop = device("n2", "laptop");
    store.register_device(&laptop).await.unwrap();
    // Registering again changes nothing.
    store.register_device(&laptop).await.unwrap();
    let page = store.pull(&laptop, &chat, None, 50).await.unwrap();
    assert_eq!(seqs(&page), vec![10, 9, 8, 7]);
    // The phone's later acks do not take anything away from the laptop.
    store
        .ack(&phone, &chat, SeqRange { lo: 7, hi: 10 })
        .await
        .unwrap();
    let page = store.pull(&laptop, &chat, None, 50).await.unwrap();
    assert_eq!(seqs(&page), vec![10, 9, 8, 7]);
}

async fn digest_counts_and_clear_by_version(store: &dyn Store) {
    let chat = direct("d1", "d2");
    let reader = device("d2", "phone");
    store.register_device(&reader).await.unwrap();
    append_n(store, &chat, "d1", 3).await;
    let first = store.digest(&reader, 2).await.unwrap();
    let entry = &first.conversations[0];
    assert_eq!(entry.conversation, chat);
    assert_eq!((entry.count, entry.unacked, entry.max_seq), (3, 3, 3));
    assert_eq!(
        entry.last.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 2]
    );
    store.append(message(&chat, "d1", "after")).await.unwrap();
    store.clear_counters(&reader, first.version).await.unwrap();
    let second = store.digest(&reader, 2).await.unwrap();
    assert!(second.version > first.version);
    let entry = &second.conversations[0];
    assert_eq!((entry.count, entry.unacked), (1, 4));
    let unknown = store.clear_counters(&reader, second.version + 5).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(_))));
    // Own messages are never counted for their sender.
    let sender = device("d1", "laptop");
    store.register_device(&sender).await.unwrap();
    let digest = store.digest(&sender, 1).await.unwrap();
    assert!(digest.conversations.iter().all(|c| c.count == 0));
}

/// What `fit` drops from a digest is not recorded: clearing that digest leaves it counted.
async fn fitted_digest_records_only_what_it_kept(store: &dyn Store) {
    let reader = device("f0", "phone");
    store.register_device(&reader).await.unwrap();
    let (kept, dropped) = (direct("f0", "f1"), direct("f0", "f2"));
    append_n(store, &kept, "f1", 2).await;
    append_n(store, &dropped, "f2", 3).await;
    let keep = kept.clone();
    let fit = move |states: &mut Vec<super::ConversationState>| {
        states.retain(|state| state.conversation == keep);
    };
    let shape = DigestShape {
        last_n: 1,
        max_backlog: 0,
    };
    let shown = store.fitted_digest(&reader, shape, &fit).await.unwrap();
    assert_eq!(shown.conversations.len(), 1);
    assert_eq!(shown.conversations[0].conversation, kept);
    store.clear_counters(&reader, shown.version).await.unwrap();
    let next = store.digest(&reader, 1).await.unwrap();
    let count = |conversation: &Conversation| {
        let state = next
            .conversations
            .iter()
            .find(|s| &s.conversation == conversation);
        state.map(|s| s.count)
    };
    assert_eq!(count(&kept), Some(0));
    assert_eq!(count(&dropped), Some(3));
}

/// A batch of digests: each device gets its own, fitted by its own `fit`, in request
/// order, recorded as if built one at a time.
async fn digests_of_many_devices_come_in_request_order(store: &dyn Store) {
    let mut requests = Vec::new();
    for n in 1..=3u64 {
        let reader = device(&format!("b{n}"), "phone");
        store.register_device(&reader).await.unwrap();
        append_n(store, &direct(&reader.uid, "bsender"), "bsender", n).await;
        let fit: Box<super::DigestFit> = if n == 3 {
            Box::new(|states: &mut Vec<super::ConversationState>| states.clear())
        } else {
            Box::new(|_: &mut Vec<super::ConversationState>| {})
        };
        requests.push(super::DigestRequest {
            device: reader,
            fit,
        });
    }
    let shape = DigestShape {
        last_n: 1,
        max_backlog: 0,
    };
    let built = store.fitted_digests(&requests, shape).await;
    let counts: Vec<Vec<u64>> = built
        .iter()
        .map(|digest| {
            let digest = digest.as_ref().unwrap();
            digest.conversations.iter().map(|c| c.count).collect()
        })
        .collect();
    assert_eq!(counts, vec![vec![1], vec![2], vec![]]);
    for (request, digest) in requests.iter().zip(&built) {
        let version = digest.as_ref().unwrap().version;
        store
            .clear_counters(&request.device, version)
            .await
            .unwrap();
    }
    // The third digest showed nothing, so clearing it left its counter standing.
    let third = store.digest(&requests[2].device, 1).await.unwrap();
    assert_eq!(third.conversations[0].count, 3);
    let first = store.digest(&requests[0].device, 1).await.unwrap();
    assert!(first.conversations.iter().all(|c| c.count == 0));
}

async fn history_and_read_cursor(store: &dyn Store) {
    let chat = direct("h1", "h2");
    append_n(store, &chat, "h1", 5).await;
    let older = store.history(&chat, Some(4), 2).await.unwrap();
    assert_eq!(seqs(&older), vec![3, 2]);
    assert!(!older.end);
    let oldest = store.history(&chat, Some(2), 2).await.unwrap();
    assert!(oldest.end);
    let nothing = store.history(&direct("h1", "h9"), None, 2).await.unwrap();
    assert!(nothing.messages.is_empty() && nothing.end);
    assert_eq!(store.mark_read(&uid("h2"), &chat, 4).await.unwrap(), (0, 4));
    assert_eq!(store.mark_read(&uid("h2"), &chat, 2).await.unwrap(), (4, 4));
    let reader = device("h1", "phone");
    store.register_device(&reader).await.unwrap();
    append_n(store, &chat, "h2", 1).await;
    let digest = store.digest(&reader, 1).await.unwrap();
    assert_eq!(digest.conversations[0].peer_read_seq, 4);
    assert!(store.mark_read(&uid("zz"), &chat, 1).await.is_err());
    let beyond = store.mark_read(&uid("h2"), &chat, 99).await;
    assert!(matches!(beyond, Err(StoreError::Invalid(_))), "{beyond:?}");
}

/// A device that acked everything still hears of a read made on another device of its user:
/// its next digest lists the conversation with the user's cursor, once.
fn pusher(owner: &Device, pushkey: &str, created_ms: i64) -> super::Pusher {
    super::Pusher {
        device: owner.clone(),
        app_id: "com.example.chat".into(),
        pushkey: pushkey.into(),
        url: "http://gateway/_matrix/push/v1/notify".into(),
        format: "event_id_only".into(),
        lang: "en".into(),
        data_json: "{}".into(),
        created_ms,
    }
}

async fn pushers_are_unique_per_key_bounded_per_device_and_forgotten_with_it(store: &dyn Store) {
    use super::PusherSaved;
    let (phone, tablet) = (device("pu1", "phone"), device("pu1", "tablet"));
    let other = device("pu2", "phone");
    for owner in [&phone, &tablet, &other] {
        store.register_device(owner).await.unwrap();
    }
    let saved = |displaced| PusherSaved::Saved { displaced };
    assert_eq!(
        store.set_pusher(&pusher(&phone, "k1", 1), 2).await.unwrap(),
        saved(None)
    );
    assert_eq!(
        store.set_pusher(&pusher(&phone, "k2", 2), 2).await.unwrap(),
        saved(None)
    );
    // Setting one it holds again is no new pusher; a third is refused.
    assert_eq!(
        store.set_pusher(&pusher(&phone, "k2", 3), 2).await.unwrap(),
        saved(None)
    );
    assert_eq!(
        store.set_pusher(&pusher(&phone, "k3", 4), 2).await.unwrap(),
        PusherSaved::Full
    );
    assert_eq!(
        store
            .set_pusher(&pusher(&tablet, "k3", 5), 2)
            .await
            .unwrap(),
        saved(None)
    );
    let keys = |list: Vec<super::Pusher>| -> Vec<(String, String, i64)> {
        list.into_iter()
            .map(|p| (p.device.client_id, p.pushkey, p.created_ms))
            .collect()
    };
    assert_eq!(
        keys(store.pushers(&uid("pu1")).await.unwrap()),
        [
            ("phone".into(), "k1".into(), 1),
            ("phone".into(), "k2".into(), 3),
            ("tablet".into(), "k3".into(), 5)
        ]
    );
    // Another user's device that sets the same key takes it over.
    assert_eq!(
        store.set_pusher(&pusher(&other, "k1", 6), 2).await.unwrap(),
        saved(Some(phone.clone()))
    );
    assert_eq!(store.pushers(&uid("pu1")).await.unwrap().len(), 2);
    assert_eq!(
        keys(store.pushers(&uid("pu2")).await.unwrap()),
        [("phone".into(), "k1".into(), 6)]
    );
    // The device that lost it is told once, at its next digest.
    let told = |device: &Device| {
        let device = device.clone();
        async move {
            let gone = store.take_pushers_gone(&device, 10).await.unwrap();
            gone.into_iter()
                .map(|g| (g.pushkey, g.reason))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(told(&phone).await, [("k1".to_owned(), "moved".to_owned())]);
    assert!(told(&phone).await.is_empty());
    // Only its owner removes it.
    let app = "com.example.chat";
    let pu1 = uid("pu1");
    let removing = store.remove_pusher(&pu1, app, "k1", "removed");
    assert_eq!(removing.await.unwrap(), None);
    let removed = store
        .remove_pusher(&uid("pu2"), app, "k1", "rejected")
        .await
        .unwrap();
    assert_eq!(removed.map(|p| p.device), Some(other.clone()));
    assert_eq!(
        told(&other).await,
        [("k1".to_owned(), "rejected".to_owned())]
    );
    // A forgotten device's pushers go with it.
    store.forget_device(&phone).await.unwrap();
    assert_eq!(
        keys(store.pushers(&uid("pu1")).await.unwrap()),
        [("tablet".into(), "k3".into(), 5)]
    );
}

async fn the_push_queue_delays_coalesces_retries_and_cancels(store: &dyn Store) {
    use super::{now_ms, PushDue, PushTiming};
    let phone = device("pq2", "phone");
    store.register_device(&phone).await.unwrap();
    store
        .set_pusher(&pusher(&phone, "pq2-key", 1), 5)
        .await
        .unwrap();
    let chat = direct("pq1", "pq2");
    append_n(store, &chat, "pq1", 2).await; // stored at 1,000
                                            // Without a pusher nothing is owed.
    append_n(store, &direct("pq1", "pq3"), "pq1", 1).await;
    let at = |now_ms| PushTiming {
        now_ms,
        delay_ms: 2_000,
        coalesce_ms: 10_000,
        lease_ms: 30_000,
    };
    let mine = |all: Vec<PushDue>| -> Vec<PushDue> {
        all.into_iter()
            .filter(|d| d.uid.as_str().starts_with("pq"))
            .collect()
    };
    let claim =
        |now_ms| async move { mine(store.claim_pushes("node-a", at(now_ms), 100).await.unwrap()) };
    assert!(claim(2_999).await.is_empty(), "not before the delay");
    let due = claim(3_000).await;
    let expected = PushDue {
        uid: uid("pq2"),
        conversation: Some(chat.clone()),
        seq: 2,
        attempts: 0,
    };
    assert_eq!(due, std::slice::from_ref(&expected));
    assert!(claim(3_000).await.is_empty(), "claimed once");
    // A failure is retried at its time with the same seq (so the same id), even with a
    // newer message in between.
    store.push_failed(&due[0], 3_500).await.unwrap();
    append_n(store, &chat, "pq1", 3).await;
    assert!(claim(3_400).await.is_empty());
    let retried = claim(3_500).await;
    assert_eq!(
        retried,
        [PushDue {
            attempts: 1,
            ..expected
        }]
    );
    store.push_done(&retried[0], 3_600, true).await.unwrap();
    // The third message waits for the coalescing window.
    assert!(claim(13_599).await.is_empty());
    assert_eq!(
        claim(13_600)
            .await
            .iter()
            .map(|d| d.seq)
            .collect::<Vec<_>>(),
        [3]
    );
    let third = PushDue {
        uid: uid("pq2"),
        conversation: Some(chat.clone()),
        seq: 3,
        attempts: 0,
    };
    store.push_done(&third, 13_700, true).await.unwrap();
    // A read cancels what it covers and queues a counts-only update; a connect cancels all.
    append_n(store, &chat, "pq1", 4).await;
    store
        .push_handled(&uid("pq2"), Some((&chat, 4)))
        .await
        .unwrap();
    let counts = claim(now_ms() + 2_000).await;
    assert_eq!(
        counts
            .iter()
            .map(|d| d.conversation.clone())
            .collect::<Vec<_>>(),
        [None]
    );
    store.push_done(&counts[0], now_ms(), true).await.unwrap();
    append_n(store, &chat, "pq1", 5).await;
    store.push_handled(&uid("pq2"), None).await.unwrap();
    assert!(claim(now_ms() + 60_000).await.is_empty());
    // One skipped (the user was online) holds nothing back: the next is due after the delay.
    append_n(store, &chat, "pq1", 6).await;
    let moot = claim(now_ms() + 60_000).await;
    assert_eq!(moot.iter().map(|d| d.seq).collect::<Vec<_>>(), [6]);
    let skipped_at = now_ms() + 60_000;
    store.push_done(&moot[0], skipped_at, false).await.unwrap();
    append_n(store, &chat, "pq1", 7).await;
    assert_eq!(
        claim(skipped_at + 2_000)
            .await
            .iter()
            .map(|d| d.seq)
            .collect::<Vec<_>>(),
        [7]
    );
    // The badge: stored messages after the read cursor, never one's own.
    assert_eq!(store.unread_total(&uid("pq2")).await.unwrap(), 7);
    store.mark_read(&uid("pq2"), &chat, 3).await.unwrap();
    assert_eq!(store.unread_total(&uid("pq2")).await.unwrap(), 4);
    assert_eq!(store.unread_total(&uid("pq1")).await.unwrap(), 0);
}

async fn a_read_on_another_device_is_in_the_next_digest(store: &dyn Store) {
    let chat = direct("rd1", "rd2");
    let laptop = device("rd2", "laptop");
    store.register_device(&laptop).await.unwrap();
    append_n(store, &chat, "rd1", 3).await;
    store
        .ack(&laptop, &chat, SeqRange { lo: 1, hi: 3 })
        .await
        .unwrap();
    let before = store.digest(&laptop, 1).await.unwrap();
    let listed = |digest: &super::DigestSnapshot| {
        digest
            .conversations
            .iter()
            .find(|c| c.conversation == chat)
            .map(|c| c.read_seq)
    };
    assert_eq!(listed(&before), None, "nothing new for the laptop");
    store.mark_read(&uid("rd2"), &chat, 3).await.unwrap();
    let after = store.digest(&laptop, 1).await.unwrap();
    assert_eq!(
        listed(&after),
        Some(3),
        "the phone's read reaches the laptop"
    );
    let again = store.digest(&laptop, 1).await.unwrap();
    assert_eq!(listed(&again), None, "reported once");
}

async fn groups_roles_and_membership(store: &dyn Store) {
    let team = group("gr-team");
    store
        .create_group(&team, &uid("gr-owner"), &uids(&["gr-a", "gr-b"]))
        .await
        .unwrap();
    let again = store.create_group(&team, &uid("gr-a"), &[]).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        store.role(&uid("gr-owner"), &team).await.unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(
        store.role(&uid("gr-a"), &team).await.unwrap(),
        Some(Role::Member)
    );
    assert_eq!(store.role(&uid("gr-z"), &team).await.unwrap(), None);
    // Added members start after what was said before they joined.
    append_n(store, &team, "gr-a", 2).await;
    let added = store
        .add_members(&team, &uids(&["gr-c", "gr-a"]), Role::Admin)
        .await
        .unwrap();
    assert_eq!(added, uids(&["gr-c"]), "only new members are reported");
    assert_eq!(
        store.role(&uid("gr-a"), &team).await.unwrap(),
        Some(Role::Admin)
    );
    let newcomer = device("gr-c", "phone");
    store.register_device(&newcomer).await.unwrap();
    let page = store.pull(&newcomer, &team, None, 10).await.unwrap();
    assert!(page.messages.is_empty() && page.end);
    append_n(store, &team, "gr-b", 1).await;
    let page = store.pull(&newcomer, &team, None, 10).await.unwrap();
    assert_eq!(seqs(&page), vec![3]);
    // Highest role first, then by uid.
    let members: Vec<(String, Role)> = store
        .members(&team)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.uid.to_string(), m.role))
        .collect();
    let expected = [
        ("gr-owner", Role::Owner),
        ("gr-a", Role::Admin),
        ("gr-c", Role::Admin),
        ("gr-b", Role::Member),
    ];
    let expected: Vec<(String, Role)> = expected
        .iter()
        .map(|(uid, role)| ((*uid).to_owned(), *role))
        .collect();
    assert_eq!(members, expected);
    let nowhere = group("gr-none");
    let missing = store.members(&nowhere).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    let missing = store
        .add_members(&nowhere, &uids(&["x"]), Role::Member)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    // Groups only, with roles; 1:1 chats are not listed.
    let other = group("gr-other");
    store.create_group(&other, &uid("gr-a"), &[]).await.unwrap();
    append_n(store, &direct("gr-a", "gr-b"), "gr-a", 1).await;
    let mine = store.group_memberships(&uid("gr-a")).await.unwrap();
    assert_eq!(mine, vec![(other, Role::Owner), (team, Role::Admin)]);
}

async fn removals_are_logged_in_order(store: &dyn Store) {
    let club = group("rm-club");
    let members = uids(&["rm-a", "rm-b", "rm-c"]);
    store
        .create_group(&club, &uid("rm-owner"), &members)
        .await
        .unwrap();
    let before = store.removals_since(0, 1000).await.unwrap();
    let last = before.last().map_or(0, |r| r.id);
    let removed = store
        .remove_members(&club, &uids(&["rm-b", "rm-x"]))
        .await
        .unwrap();
    assert_eq!(removed, uids(&["rm-b"]), "only members are removed");
    store.remove_members(&club, &uids(&["rm-a"])).await.unwrap();
    assert_eq!(store.role(&uid("rm-b"), &club).await.unwrap(), None);
    let logged = store.removals_since(last, 1000).await.unwrap();
    let seen: Vec<(Conversation, String)> = logged
        .iter()
        .map(|r| (r.conversation.clone(), r.uid.to_string()))
        .collect();
    let expected = vec![(club.clone(), "rm-b".to_owned()), (club, "rm-a".to_owned())];
    assert_eq!(seen, expected);
    assert!(logged[0].id > last && logged[1].id > logged[0].id);
    let limited = store.removals_since(last, 1).await.unwrap();
    assert_eq!(limited.len(), 1);
    assert!(store
        .removals_since(logged[1].id, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn receipts_and_senders(store: &dyn Store) {
    let room = group("rc-room");
    let members = uids(&["rc-a", "rc-b", "rc-c"]);
    store
        .create_group(&room, &uid("rc-a"), &members[1..])
        .await
        .unwrap();
    append_n(store, &room, "rc-a", 2).await;
    append_n(store, &room, "rc-b", 1).await;
    store.mark_read(&uid("rc-b"), &room, 2).await.unwrap();
    store.mark_read(&uid("rc-c"), &room, 3).await.unwrap();
    let receipts = store.receipts(&room, &[1, 3, 9], 1).await.unwrap();
    let summary: Vec<(u64, &str, u64, usize)> = receipts
        .iter()
        .map(|r| (r.seq, r.sender.as_str(), r.read_count, r.readers.len()))
        .collect();
    // Seq 9 does not exist; a sender never counts as a reader; names are limited.
    assert_eq!(summary, vec![(1, "rc-a", 2, 1), (3, "rc-b", 1, 1)]);
    assert_eq!(receipts[1].readers, uids(&["rc-c"]));
    let mut senders = store
        .senders(&room, SeqRange { lo: 1, hi: 3 })
        .await
        .unwrap();
    senders.sort();
    assert_eq!(senders, uids(&["rc-a", "rc-b"]));
    let first = store
        .senders(&room, SeqRange { lo: 1, hi: 2 })
        .await
        .unwrap();
    assert_eq!(first, uids(&["rc-a"]));
}

async fn sizes_count_what_was_written(store: &dyn Store) {
    let before = store.sizes().await.unwrap();
    append_n(store, &direct("sz1", "sz2"), "sz1", 4).await;
    store
        .create_group(&group("sz-g"), &uid("sz1"), &[])
        .await
        .unwrap();
    store
        .register_device(&device("sz3", "phone"))
        .await
        .unwrap();
    store
        .register_device(&device("sz3", "laptop"))
        .await
        .unwrap();
    let after = store.sizes().await.unwrap();
    assert_eq!(after.messages, before.messages + 4);
    assert_eq!(after.conversations, before.conversations + 2);
    assert_eq!(after.groups, before.groups + 1);
    assert_eq!(after.users, before.users + 1);
    assert_eq!(after.devices, before.devices + 2);
}

/// Runs garbage collection in steps of `batch` until nothing is due.
async fn collect_all(store: &dyn Store, cutoffs: Cutoffs, batch: usize) -> Collected {
    let mut total = Collected::default();
    for _ in 0..1000 {
        let step = store.collect_garbage(cutoffs, batch).await.unwrap();
        total.messages += step.messages;
        total.devices += step.devices;
        if !step.more {
            return total;
        }
    }
    panic!("garbage collection never caught up");
}

/// Appends `n` messages from `sender` stored at `server_time` (retention cases use times
/// before any other case's, so that their cutoffs touch nothing else).
async fn append_at(store: &dyn Store, conversation: &Conversation, sender: &str, n: u64, at: i64) {
    for i in 0..n {
        let mut new = message(conversation, sender, &format!("{conversation}-{at}-{i}"));
        new.server_time = at;
        store.append(new).await.unwrap();
    }
}

/// How many messages of a conversation are stored (up to 100).
async fn stored(store: &dyn Store, conversation: &Conversation) -> usize {
    let page = store.history(conversation, None, 100).await.unwrap();
    page.messages.len()
}

/// The id of the newest eviction logged so far (0: none).
async fn last_eviction(store: &dyn Store) -> u64 {
    let all = store.evictions_since(0, 10_000).await.unwrap();
    all.last().map_or(0, |e| e.id)
}

/// Retention deletes each conversation's oldest messages as a prefix, of one kind only;
/// Pull, History and digests step over what is gone, and the first Pull says how much.
async fn retention_deletes_a_prefix_that_pulls_report(store: &dyn Store) {
    const OLD: i64 = -9_000_000;
    let chat = direct("rt1", "rt2");
    let group = group("rt-g");
    store
        .create_group(&group, &uid("rt2"), &uids(&["rt1"]))
        .await
        .unwrap();
    let (phone, laptop) = (device("rt1", "phone"), device("rt1", "laptop"));
    store.register_device(&phone).await.unwrap();
    store.register_device(&laptop).await.unwrap();
    append_at(store, &chat, "rt2", 5, OLD).await;
    append_at(store, &group, "rt2", 2, OLD).await;
    append_at(store, &chat, "rt2", 3, 1_000).await;
    let before = store.sizes().await.unwrap();
    let cutoffs = Cutoffs {
        direct: Some(OLD + 1),
        ..Cutoffs::default()
    };
    assert_eq!(collect_all(store, cutoffs, 2).await.messages, 5);
    assert_eq!(
        collect_all(store, cutoffs, 2).await.messages,
        0,
        "nothing twice"
    );
    assert_eq!(store.sizes().await.unwrap().messages, before.messages - 5);
    let history = store.history(&chat, None, 20).await.unwrap();
    assert_eq!((seqs(&history), history.end), (vec![8, 7, 6], true));
    // The group's retention is not the 1:1 chats'.
    assert_eq!(stored(store, &group).await, 2);
    let digest = store.digest(&laptop, 1).await.unwrap();
    let state = digest
        .conversations
        .iter()
        .find(|c| c.conversation == chat)
        .unwrap();
    assert_eq!((state.unacked, state.count), (3, 3));
    let page = store.pull(&phone, &chat, None, 20).await.unwrap();
    assert_eq!((seqs(&page), page.end, page.gone), (vec![8, 7, 6], true, 5));
    let again = store.pull(&phone, &chat, None, 20).await.unwrap();
    assert_eq!(
        (seqs(&again), again.gone),
        (vec![8, 7, 6], 0),
        "reported once"
    );
    // Acknowledging across the deleted prefix is no error.
    let acked = store
        .pull(&phone, &chat, SeqRange::new(1, 8), 20)
        .await
        .unwrap();
    assert!(acked.messages.is_empty() && acked.end);
    let groups = Cutoffs {
        group: Some(OLD + 1),
        ..Cutoffs::default()
    };
    assert_eq!(collect_all(store, groups, 100).await.messages, 2);
    assert_eq!(stored(store, &group).await, 0);
}

/// A device with more unacknowledged messages than the cap skips the oldest: its digest
/// says how many until it clears that digest, and its pulls start below the newest kept.
/// Other devices of the user keep their own backlog.
async fn backlog_cap_skips_the_oldest_and_reports_them(store: &dyn Store) {
    let chat = direct("cap1", "cap2");
    // The phone sent the first two itself: they are not its backlog, nor missed.
    let (phone, laptop) = (device("cap1", "cap1-phone"), device("cap1", "laptop"));
    store.register_device(&phone).await.unwrap();
    store.register_device(&laptop).await.unwrap();
    append_n(store, &chat, "cap1", 2).await;
    append_n(store, &chat, "cap2", 10).await;
    let capped = DigestShape {
        last_n: 1,
        max_backlog: 4,
    };
    let first = store.fitted_digest(&phone, capped, &|_| {}).await.unwrap();
    let state = &first.conversations[0];
    assert_eq!((state.unacked, state.missed), (4, 6));
    assert_eq!(state.skipped.map(|s| (s.upto, s.count)), Some((8, 6)));
    let page = store.pull(&phone, &chat, None, 20).await.unwrap();
    assert_eq!((seqs(&page), page.end), (vec![12, 11, 10, 9], true));
    let second = store.fitted_digest(&phone, capped, &|_| {}).await.unwrap();
    let state = &second.conversations[0];
    assert_eq!(
        (state.missed, state.skipped),
        (6, None),
        "still reported, skipped once"
    );
    store.clear_counters(&phone, second.version).await.unwrap();
    store.clear_counters(&phone, first.version).await.unwrap();
    let third = store.fitted_digest(&phone, capped, &|_| {}).await.unwrap();
    assert_eq!(
        (
            third.conversations[0].missed,
            third.conversations[0].unacked
        ),
        (0, 4)
    );
    let laptop_digest = store.digest(&laptop, 1).await.unwrap();
    assert_eq!(laptop_digest.conversations[0].unacked, 12);
}

/// Devices are listed with when they were seen; expiry forgets those unseen since the
/// cutoff, forgetting is logged as an eviction, and a forgotten device starts anew.
async fn devices_are_listed_expired_and_forgotten(store: &dyn Store) {
    let chat = direct("dv1", "dv2");
    let (phone, laptop) = (device("dv1", "phone"), device("dv1", "laptop"));
    store.register_device(&phone).await.unwrap();
    store.register_device(&laptop).await.unwrap();
    append_n(store, &chat, "dv2", 3).await;
    store
        .ack(&phone, &chat, SeqRange::new(1, 3).unwrap())
        .await
        .unwrap();
    let listed = store.devices(&uid("dv1")).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|d| d.client_id.as_str()).collect();
    assert_eq!(ids, vec!["laptop", "phone"]);
    assert!(listed.iter().all(|d| d.last_seen > 1_000_000_000_000));
    // Only the phone is older than the cutoff.
    store
        .touch_devices(std::slice::from_ref(&phone), 10)
        .await
        .unwrap();
    let cutoffs = Cutoffs {
        devices: Some(11),
        ..Cutoffs::default()
    };
    assert_eq!(collect_all(store, cutoffs, 1).await.devices, 1);
    let ids: Vec<String> = store
        .devices(&uid("dv1"))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.client_id)
        .collect();
    assert_eq!(ids, vec!["laptop".to_owned()]);
    let last = last_eviction(store).await;
    assert!(store.forget_device(&laptop).await.unwrap());
    assert!(!store.forget_device(&laptop).await.unwrap());
    let evictions = store.evictions_since(last, 10).await.unwrap();
    let named: Vec<(&str, Option<&str>)> = evictions
        .iter()
        .map(|e| (e.uid.as_str(), e.client_id.as_deref()))
        .collect();
    assert_eq!(
        named,
        vec![("dv1", Some("laptop")), ("dv1", Some("laptop"))]
    );
    // The forgotten phone comes back as a new device: nothing of its old acks.
    store.register_device(&phone).await.unwrap();
    let digest = store.digest(&phone, 1).await.unwrap();
    assert_eq!(digest.conversations[0].unacked, 3);
    // The logs are pruned once every node has long read them.
    let logs = Cutoffs {
        logs: Some(super::now_ms() + 60_000),
        ..Cutoffs::default()
    };
    collect_all(store, logs, 1).await;
    assert!(store.evictions_since(0, 10).await.unwrap().is_empty());
    assert!(store.removals_since(0, 10).await.unwrap().is_empty());
}

/// Erasing a user: devices, memberships and 1:1 messages go, group messages are redacted
/// (or deleted), an owned group passes on, an eviction is logged; again, nothing is left.
async fn erasing_a_user_removes_its_traces(store: &dyn Store) {
    let chat = direct("er1", "er2");
    let group = group("er-g");
    store
        .create_group(&group, &uid("er1"), &uids(&["er2"]))
        .await
        .unwrap();
    store
        .register_device(&device("er1", "phone"))
        .await
        .unwrap();
    let peer = device("er2", "er2-phone");
    store.register_device(&peer).await.unwrap();
    append_n(store, &chat, "er1", 2).await;
    append_n(store, &chat, "er2", 1).await;
    append_n(store, &group, "er1", 2).await;
    append_n(store, &group, "er2", 1).await;
    let unacked = |digest: &super::DigestSnapshot, conversation: &Conversation| {
        let state = digest
            .conversations
            .iter()
            .find(|c| &c.conversation == conversation);
        state.map_or(0, |c| c.unacked)
    };
    // The peer's counters are counted (and cached, with a cache) before the erasure.
    let before = store.digest(&peer, 1).await.unwrap();
    assert_eq!((unacked(&before, &chat), unacked(&before, &group)), (2, 2));
    let last = last_eviction(store).await;
    let erased = store
        .erase_user(&uid("er1"), GroupErasure::Redact)
        .await
        .unwrap();
    assert_eq!(
        (
            erased.devices,
            erased.groups,
            erased.messages_deleted,
            erased.messages_redacted
        ),
        (1, 1, 2, 2)
    );
    let left = store.history(&chat, None, 20).await.unwrap();
    assert_eq!(
        left.messages
            .iter()
            .map(|m| m.sender.as_str())
            .collect::<Vec<_>>(),
        vec!["er2"]
    );
    let bodies: Vec<(u64, bool)> = store
        .history(&group, None, 20)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| (m.seq, m.body.is_empty()))
        .collect();
    assert_eq!(bodies, vec![(3, false), (2, true), (1, true)]);
    let members = store.members(&group).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(
        (members[0].uid.as_str(), members[0].role),
        ("er2", Role::Owner)
    );
    assert!(store.devices(&uid("er1")).await.unwrap().is_empty());
    let evictions = store.evictions_since(last, 10).await.unwrap();
    assert_eq!(evictions.len(), 1);
    assert_eq!(
        (evictions[0].uid.as_str(), evictions[0].client_id.as_deref()),
        ("er1", None)
    );
    // The erased 1:1 messages no longer count for the peer; redacted ones still do.
    let after = store.digest(&peer, 1).await.unwrap();
    assert_eq!((unacked(&after, &chat), unacked(&after, &group)), (0, 2));
    let again = store
        .erase_user(&uid("er1"), GroupErasure::Redact)
        .await
        .unwrap();
    assert_eq!(again, super::Erased::default());
    // Deleting instead: er2's group message goes.
    let erased = store
        .erase_user(&uid("er2"), GroupErasure::Delete)
        .await
        .unwrap();
    assert_eq!(
        (
            erased.devices,
            erased.messages_deleted,
            erased.messages_redacted
        ),
        (1, 2, 0)
    );
    assert_eq!(stored(store, &group).await, 2);
}

/// After `close`, what was committed stays and every call fails as unavailable.
async fn retained_messages_are_replaced_and_removed(store: &dyn Store) {
    let put = |topic: &'static str, message: Option<&[u8]>| {
        store.put_retained(topic, message.map(<[u8]>::to_vec))
    };
    put("plant/config", Some(b"v1")).await.unwrap();
    put("plant/7/state", Some(&[0, 255])).await.unwrap();
    put("plant/config", Some(b"v2")).await.unwrap();
    put("never/set", None).await.unwrap();
    let held = |list: Vec<super::Retained>| -> Vec<(String, Vec<u8>)> {
        list.into_iter().map(|r| (r.topic, r.message)).collect()
    };
    assert_eq!(
        held(store.retained().await.unwrap()),
        vec![
            ("plant/7/state".to_owned(), vec![0, 255]),
            ("plant/config".to_owned(), b"v2".to_vec()),
        ]
    );
    put("plant/7/state", None).await.unwrap();
    assert_eq!(
        held(store.retained().await.unwrap()),
        vec![("plant/config".to_owned(), b"v2".to_vec())]
    );
    put("plant/config", None).await.unwrap();
    assert!(store.retained().await.unwrap().is_empty());
}

async fn closed_store_refuses_calls(store: &dyn Store) {
    let chat = direct("c1", "c2");
    let queued = store
        .queue_append(message(&chat, "c1", "before-close"), None)
        .await
        .unwrap();
    store.close().await;
    assert_eq!(
        queued.committed().await.unwrap().seq,
        1,
        "queued writes are flushed"
    );
    let append = store.append(message(&chat, "c1", "after-close")).await;
    assert!(
        matches!(append, Err(StoreError::Unavailable(_))),
        "{append:?}"
    );
    let reader = device("c2", "phone");
    let ack = store.ack(&reader, &chat, SeqRange { lo: 1, hi: 1 }).await;
    assert!(matches!(ack, Err(StoreError::Unavailable(_))), "{ack:?}");
}
