//! The checkpoint watermark of one shard: records complete in any order, the watermark only
//! moves over a prefix of records that are all complete.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::stream::SequenceNumber;

/// A record's place in its shard's watermark.
pub type Ticket = u64;

/// Tracks submitted records of one shard in submission (= stream) order.
#[derive(Debug, Default)]
pub struct Watermark {
    /// Ticket of `slots[0]`.
    front: Ticket,
    /// Submitted records not yet passed by the watermark: each one's sequence number, since
    /// when it waits (creation, else submission; milliseconds since the epoch) and whether it
    /// is complete. A backlog keeps one per record read: 40 bytes each, nothing on the heap.
    slots: VecDeque<(SequenceNumber, u64, bool)>,
    handled_through: Option<SequenceNumber>,
}

impl Watermark {
    /// Registers the next record of the shard, created at `created` (if the source says).
    pub fn push(&mut self, sequence: SequenceNumber, created: Option<SystemTime>) -> Ticket {
        let since = created.unwrap_or_else(SystemTime::now);
        let millis = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        self.slots.push_back((sequence, millis, false));
        self.front + self.slots.len() as Ticket - 1
    }

    /// Marks a record complete and moves the watermark over every complete record at the front.
    /// Completing a ticket twice, or one already passed, changes nothing.
    pub fn complete(&mut self, ticket: Ticket) {
        let Some(index) = ticket.checked_sub(self.front) else {
            return;
        };
        if let Some(slot) = usize::try_from(index).ok().and_then(|i| self.slots.get_mut(i)) {
            slot.2 = true;
        }
        while self.slots.front().is_some_and(|(_, _, done)| *done) {
            if let Some((sequence, _, _)) = self.slots.pop_front() {
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

    /// When the oldest record not yet handled was created (or submitted, when its source gave
    /// no time), to the millisecond; `None` when every record is handled.
    pub fn waiting_since(&self) -> Option<SystemTime> {
        self.slots
            .front()
            .map(|(_, millis, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(*millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u32) -> SequenceNumber {
        SequenceNumber::parse(&format!("{n:021}")).expect("digits")
    }

    #[test]
    fn a_pending_record_holds_forty_bytes() {
        // A power of two, so that the queue's capacity is exactly the count.
        let count = 16_384;
        let sequences: Vec<SequenceNumber> = (0..count).map(|n| seq(4_000_000 + n)).collect();
        let before = crate::heap_probe::live_bytes();
        let mut watermark = Watermark::default();
        // Cloned, not moved: freeing the vector inside the window would hide what the queue takes.
        for sequence in &sequences {
            watermark.push(sequence.clone(), Some(SystemTime::now()));
        }
        let per_record = (crate::heap_probe::live_bytes() - before) / count as isize;
        assert!(per_record <= 40, "{per_record} bytes per pending record");
        assert_eq!(watermark.pending(), count as usize);
    }

    #[test]
    fn out_of_order_completion_holds_the_watermark_at_the_first_gap() {
        let mut watermark = Watermark::default();
        let tickets: Vec<Ticket> = (1..=5).map(|n| watermark.push(seq(n * 10), None)).collect();
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
        let first = watermark.push(seq(1), None);
        watermark.complete(first);
        watermark.complete(first);
        let second = watermark.push(seq(2), None);
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

    /// The oldest record not yet handled says since when the shard waits: a stuck first record
    /// keeps it however many later records complete.
    #[test]
    fn waiting_since_is_the_oldest_unhandled_record() {
        let mut watermark = Watermark::default();
        assert_eq!(watermark.waiting_since(), None);
        // Kept to the millisecond.
        let to_millis = |at: SystemTime| {
            let since = at.duration_since(SystemTime::UNIX_EPOCH).expect("after the epoch");
            SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
        };
        let hour_ago = to_millis(SystemTime::now() - Duration::from_secs(3600));
        let stuck = watermark.push(seq(1), Some(hour_ago));
        let later: Vec<Ticket> = (2..=4).map(|n| watermark.push(seq(n), None)).collect();
        for ticket in later {
            watermark.complete(ticket);
        }
        assert_eq!(watermark.waiting_since(), Some(hour_ago));
        watermark.complete(stuck);
        assert_eq!(watermark.waiting_since(), None);
        let unknown = to_millis(SystemTime::now());
        watermark.push(seq(5), None);
        assert!(
            watermark.waiting_since().is_some_and(|since| since >= unknown),
            "no creation time: since it was submitted"
        );
    }
}
