//! Acknowledgements towards rumqttd, in the order rumqttd sent the publishes: rumqttd 0.20
//! drops a link whose PUBACK does not answer its oldest publish in flight. A client may ack
//! out of order, and the topic ACL drops some deliveries without the client ever seeing
//! them; both wait here until everything rumqttd sent before them is answered.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::edge::codec::{self, kind};

/// One publish rumqttd sent at QoS 1 or 2.
#[derive(Debug)]
struct InFlight {
    pkid: u16,
    /// `PUBACK` (QoS 1) or `PUBREC` (QoS 2).
    answer: u8,
    answered: bool,
}

/// rumqttd's publishes to one connection still unanswered, oldest first.
#[derive(Debug, Default)]
pub(crate) struct UpstreamAcks {
    in_flight: VecDeque<InFlight>,
}

impl UpstreamAcks {
    /// A publish passed on to the client; its answer comes with the client's ack.
    pub(crate) fn forwarded(&mut self, pkid: u16, answer: u8) {
        let pending = |f: &InFlight| f.pkid == pkid && f.answer == answer && !f.answered;
        if !self.in_flight.iter().any(pending) {
            self.in_flight.push_back(InFlight {
                pkid,
                answer,
                answered: false,
            });
        }
    }

    /// A publish kept from the client: answered now, written once its turn comes.
    pub(crate) fn dropped(&mut self, pkid: u16, answer: u8, out: &mut BytesMut) {
        self.in_flight.push_back(InFlight {
            pkid,
            answer,
            answered: true,
        });
        self.flush(out);
    }

    /// The client answered `pkid`; writes every answer now in order. The answer is the one
    /// rumqttd expects, whatever the client's was: a QoS 2 publish may reach the client at
    /// QoS 1 (its publisher sent QoS 1), and the client's PUBACK is then rumqttd's PUBREC.
    pub(crate) fn answered(&mut self, pkid: u16, answer: u8, out: &mut BytesMut) {
        match self
            .in_flight
            .iter_mut()
            .find(|f| f.pkid == pkid && !f.answered)
        {
            Some(in_flight) => in_flight.answered = true,
            // Not tracked (sent before this connection): pass it on as it is.
            None => codec::write_ack(out, answer, pkid),
        }
        self.flush(out);
    }

    fn flush(&mut self, out: &mut BytesMut) {
        while self.in_flight.front().is_some_and(|f| f.answered) {
            if let Some(done) = self.in_flight.pop_front() {
                codec::write_ack(out, done.answer, done.pkid);
            }
        }
    }
}

/// The answer rumqttd expects for a publish at `qos` (none for QoS 0).
pub(crate) fn answer_for(qos: u8) -> Option<u8> {
    match qos {
        1 => Some(kind::PUBACK),
        2 => Some(kind::PUBREC),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(out: &BytesMut) -> Vec<u16> {
        out.chunks(4)
            .map(|ack| u16::from_be_bytes([ack[2], ack[3]]))
            .collect()
    }

    #[test]
    fn answers_leave_in_the_order_rumqttd_sent() {
        let mut acks_out = BytesMut::new();
        let mut upstream = UpstreamAcks::default();
        upstream.forwarded(1, kind::PUBACK);
        upstream.dropped(2, kind::PUBACK, &mut acks_out);
        upstream.forwarded(3, kind::PUBACK);
        assert!(acks_out.is_empty(), "2 waits for 1");
        upstream.answered(3, kind::PUBACK, &mut acks_out);
        assert!(acks_out.is_empty(), "3 waits for 1");
        upstream.answered(1, kind::PUBACK, &mut acks_out);
        assert_eq!(acks(&acks_out), vec![1, 2, 3]);
        upstream.dropped(4, kind::PUBACK, &mut acks_out);
        assert_eq!(acks(&acks_out), vec![1, 2, 3, 4]);
    }
}
