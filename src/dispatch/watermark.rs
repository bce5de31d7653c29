//! The checkpoint watermark of one shard: records complete in any order, the watermark only
//! moves over a prefix of records that are all complete.

use std::collections::VecDeque;

use crate::stream::SequenceNumber;

/// A record's place in its shard's watermark.
pub type Ticket = u64;

/// Tracks submitted records of one shard in submission (= stream) order.
#[derive(Debug, Default)]
pub struct Watermark {
    /// Ticket of `slots[0]`.
    front: Ticket,
    /// Submitted records not yet passed by the watermark, and whether each is complete.
    slots: VecDeque<(SequenceNumber, bool)>,
    handled_through: Option<SequenceNumber>,
}

impl Watermark {
    /// Registers the next record of the shard.
    pub fn push(&mut self, sequence: SequenceNumber) -> Ticket {
        self.slots.push_back((sequence, false));
        self.front + self.slots.len() as Ticket - 1
    }

    /// Marks a record complete and moves the watermark over every complete record at the front.
    /// Completing a ticket twice, or one already passed, changes nothing.
    pub fn complete(&mut self, ticket: Ticket) {
        let Some(index) = ticket.checked_sub(self.front) else {
            return;
        };
        if let Some(slot) = usize::try_from(index).ok().and_then(|i| self.slots.get_mut(i)) {
            slot.1 = true;
        }
        while self.slots.front().is_some_and(|(_, done)| *done) {
            if let Some((sequence, _)) = self.slots.pop_front() {
                self.handled_through = Some(sequence);
                self.front += 1;
            }
        }
    }

    /// The newest record that, with every record before it, is complete.
    pub fn handled_through(&self) -> Option<&SequenceNumber> {
        self.handled_through.as_ref()
    }

    /// Records submitted and not yet passed by the watermark.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u32) -> SequenceNumber {
        SequenceNumber::parse(&format!("{n:021}")).expect("digits")
    }

    #[test]
    fn out_of_order_completion_holds_the_watermark_at_the_first_gap() {
        let mut watermark = Watermark::default();
        let tickets: Vec<Ticket> = (1..=5).map(|n| watermark.push(seq(n * 10))).collect();
        assert_eq!(watermark.handled_through(), None);

        watermark.complete(tickets[2]);
        watermark.complete(tickets[4]);
        assert_eq!(watermark.handled_through(), None, "record 1 is still running");

        watermark.complete(tickets[0]);
        assert_eq!(watermark.handled_through(), Some(&seq(10)));

        watermark.complete(tickets[1]);
        assert_eq!(
            watermark.handled_through(),
            Some(&seq(30)),
            "2 and 3 done, 4 still running"
        );
        assert_eq!(watermark.pending(), 2);

        watermark.complete(tickets[3]);
        assert_eq!(watermark.handled_through(), Some(&seq(50)));
        assert_eq!(watermark.pending(), 0);
    }

    #[test]
    fn repeated_or_stale_completions_are_harmless() {
        let mut watermark = Watermark::default();
        let first = watermark.push(seq(1));
        watermark.complete(first);
        watermark.complete(first);
        let second = watermark.push(seq(2));
        watermark.complete(first);
        assert_eq!(watermark.handled_through(), Some(&seq(1)));
        watermark.complete(second + 7);
        assert_eq!(
            watermark.handled_through(),
            Some(&seq(1)),
            "unknown ticket changes nothing"
        );
        watermark.complete(second);
        assert_eq!(watermark.handled_through(), Some(&seq(2)));
    }
}
