//! The behaviour every backend must show, run against each of them.

use super::{Device, NewMessage, SeqRange, Store, StoreError};

/// Runs every check against one store (each uses its own conversations and users).
pub(crate) async fn run_all(store: &dyn Store) {
    seqs_are_gap_free_and_duplicates_absorbed(store).await;
    pages_walk_holes_and_end(store).await;
    new_device_inherits_acks(store).await;
    digest_counts_and_clear_by_version(store).await;
    history_and_read_cursor(store).await;
}

fn device(uid: &str, client_id: &str) -> Device {
    Device {
        uid: uid.into(),
        client_id: client_id.into(),
    }
}

pub(crate) fn message(conversation: &str, sender: &str, msg_id: &str) -> NewMessage {
    let mut members: Vec<String> = conversation.split(':').skip(1).map(String::from).collect();
    members.dedup();
    NewMessage {
        conversation: conversation.into(),
        members,
        sender: sender.into(),
        sender_device: format!("{sender}-phone"),
        msg_id: msg_id.into(),
        server_time: 1_000,
        body: msg_id.as_bytes().to_vec(),
    }
}

/// Appends `n` messages from `sender` and returns their seqs.
pub(crate) async fn append_n(store: &dyn Store, conversation: &str, sender: &str, n: u64) {
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
    let first = store.append(message("dm:s1:s2", "s1", "m1")).await.unwrap();
    let second = store.append(message("dm:s1:s2", "s2", "m1")).await.unwrap();
    let again = store.append(message("dm:s1:s2", "s1", "m1")).await.unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert!(again.duplicate);
    assert_eq!(again.seq, 1);
    let all = store.history("dm:s1:s2", None, 10).await.unwrap();
    assert_eq!(seqs(&all), vec![2, 1]);
}

async fn pages_walk_holes_and_end(store: &dyn Store) {
    append_n(store, "dm:p1:p2", "p1", 100).await;
    let reader = device("p2", "phone");
    store.register_device(&reader).await.unwrap();
    let newest = store.pull(&reader, "dm:p1:p2", None, 20).await.unwrap();
    assert_eq!(seqs(&newest).first(), Some(&100));
    assert_eq!(seqs(&newest).last(), Some(&81));
    assert!(!newest.end);
    // Acknowledge the newest 20 and stop; new messages arrive; the rest is still there.
    store
        .ack(&reader, "dm:p1:p2", SeqRange { lo: 81, hi: 100 })
        .await
        .unwrap();
    store
        .append(message("dm:p1:p2", "p1", "late"))
        .await
        .unwrap();
    let next = store.pull(&reader, "dm:p1:p2", None, 20).await.unwrap();
    assert_eq!(seqs(&next)[..2], [101, 80]);
    let mut seen = seqs(&next);
    let mut cursor = SeqRange::new(*seen.last().unwrap(), seen[0]);
    loop {
        let page = store.pull(&reader, "dm:p1:p2", cursor, 30).await.unwrap();
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
    let own = store.pull(&sender, "dm:p1:p2", None, 10).await.unwrap();
    assert!(own.messages.is_empty() && own.end);
    let past = store
        .ack(&reader, "dm:p1:p2", SeqRange { lo: 500, hi: 501 })
        .await;
    assert!(matches!(past, Err(StoreError::Invalid(_))));
}

async fn new_device_inherits_acks(store: &dyn Store) {
    append_n(store, "dm:n1:n2", "n1", 10).await;
    let phone = device("n2", "phone");
    store.register_device(&phone).await.unwrap();
    store
        .ack(&phone, "dm:n1:n2", SeqRange { lo: 1, hi: 6 })
        .await
        .unwrap();
    let laptop = device("n2", "laptop");
    store.register_device(&laptop).await.unwrap();
    let page = store.pull(&laptop, "dm:n1:n2", None, 50).await.unwrap();
    assert_eq!(seqs(&page), vec![10, 9, 8, 7]);
    // The phone's later acks do not take anything away from the laptop.
    store
        .ack(&phone, "dm:n1:n2", SeqRange { lo: 7, hi: 10 })
        .await
        .unwrap();
    let page = store.pull(&laptop, "dm:n1:n2", None, 50).await.unwrap();
    assert_eq!(seqs(&page), vec![10, 9, 8, 7]);
}

async fn digest_counts_and_clear_by_version(store: &dyn Store) {
    let reader = device("d2", "phone");
    store.register_device(&reader).await.unwrap();
    append_n(store, "dm:d1:d2", "d1", 3).await;
    let first = store.digest(&reader, 2).await.unwrap();
    let entry = &first.conversations[0];
    assert_eq!((entry.count, entry.unacked, entry.max_seq), (3, 3, 3));
    assert_eq!(
        entry.last.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 2]
    );
    store
        .append(message("dm:d1:d2", "d1", "after"))
        .await
        .unwrap();
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

async fn history_and_read_cursor(store: &dyn Store) {
    append_n(store, "dm:h1:h2", "h1", 5).await;
    let older = store.history("dm:h1:h2", Some(4), 2).await.unwrap();
    assert_eq!(seqs(&older), vec![3, 2]);
    assert!(!older.end);
    let oldest = store.history("dm:h1:h2", Some(2), 2).await.unwrap();
    assert!(oldest.end);
    assert_eq!(store.mark_read("h2", "dm:h1:h2", 4).await.unwrap(), (0, 4));
    assert_eq!(store.mark_read("h2", "dm:h1:h2", 2).await.unwrap(), (4, 4));
    let reader = device("h1", "phone");
    store.register_device(&reader).await.unwrap();
    append_n(store, "dm:h1:h2", "h2", 1).await;
    let digest = store.digest(&reader, 1).await.unwrap();
    assert_eq!(digest.conversations[0].peer_read_seq, 4);
    assert!(store.mark_read("zz", "dm:h1:h2", 1).await.is_err());
}
