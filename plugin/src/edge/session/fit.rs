//! Keeping hook-layer publishes within an MQTT 5 client's Maximum Packet Size: a server must
//! not send a bigger packet, and a client that gets one disconnects — and would get the same
//! reply again on reconnect, forever. (The IM service fits digests itself, before it records
//! what they carried.)

use prost::Message;

use crate::wire::pb;

/// Upper bound of a PUBLISH's bytes around its payload.
pub(super) fn overhead(topic: &str, properties: usize) -> usize {
    // fixed header (1 + up to 4) + topic length + topic + packet id + properties length
    1 + 4 + 2 + topic.len() + 2 + 4 + properties
}

/// Shrinks a response to `budget` bytes: a page loses its oldest messages (its cursor then
/// covers only what it carries, and `end` is false). `false` if it cannot fit.
pub(super) fn response(response: &mut pb::Response, budget: usize) -> bool {
    while response.encoded_len() > budget {
        let Some(pb::response::Result::Page(page)) = response.result.as_mut() else {
            return false;
        };
        if page.messages.len() <= 1 {
            return false;
        }
        page.messages.pop();
        page.end = false;
        if let (Some(cursor), Some(oldest)) = (page.cursor.as_mut(), page.messages.last()) {
            cursor.from_seq = oldest.seq;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, size: usize) -> pb::ChatMessage {
        pb::ChatMessage {
            seq,
            msg: Some(pb::Content {
                kind: Some(pb::content::Kind::Text("x".repeat(size))),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pages_lose_their_oldest_messages() {
        let mut response = pb::Response {
            result: Some(pb::response::Result::Page(pb::Page {
                conversation: "u/a".into(),
                messages: (1..=5).rev().map(|seq| message(seq, 100)).collect(),
                cursor: Some(pb::Cursor {
                    from_seq: 1,
                    to_seq: 5,
                }),
                end: true,
                gone: 0,
            })),
            ..Default::default()
        };
        assert!(super::response(&mut response, 350));
        let Some(pb::response::Result::Page(page)) = response.result else {
            panic!("page")
        };
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![5, 4, 3]);
        assert_eq!(page.cursor.map(|c| (c.from_seq, c.to_seq)), Some((3, 5)));
        assert!(!page.end);
    }
}
