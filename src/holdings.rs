//! Amounts held by requests in flight, by the epoch they were taken in, so that what a dead VM
//! held expires on its own.
//!
//! A VM that traps (or is reloaded, or runs out of memory) never settles the reservations and
//! concurrency slots its requests hold. Each holding is therefore recorded in the slot of the
//! epoch it was taken in (`epoch = now / epoch_ms`); a ring of [`SLOTS`] epochs is kept, and a
//! slot is cleared when the ring turns past it. A settlement releases its amount from its own
//! epoch's slot if that slot is still live, and does nothing if it already expired. So a holding
//! lives at least `(SLOTS - 1) × epoch_ms` (the configured TTL) and at most `SLOTS × epoch_ms`.

/// Epochs kept. With the TTL spread over `SLOTS - 1` epochs, a holding expires between the TTL
/// and 8/7 of it.
pub const SLOTS: usize = 8;

/// The epoch length for a time-to-live: `SLOTS - 1` epochs cover it.
pub fn epoch_ms_for_ttl(ttl_ms: u64) -> u64 {
    ttl_ms.div_ceil(SLOTS as u64 - 1).max(1)
}

/// Encoded size: the newest epoch, then one amount per slot (little-endian u64s).
pub const RING_BYTES: usize = 8 * (SLOTS + 1);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ring {
    /// The newest epoch written; slot `e % SLOTS` holds epoch `e` for `e` in `head-SLOTS+1..=head`.
    head: u64,
    slots: [u64; SLOTS],
}

impl Ring {
    /// Turns the ring to `epoch`, clearing the slots of the epochs that expire. A clock that
    /// went back (another worker wrote a later epoch) keeps the newest head.
    pub fn advance(&mut self, epoch: u64) {
        if epoch <= self.head {
            return;
        }
        let gap = epoch - self.head;
        if gap >= SLOTS as u64 {
            self.slots = [0; SLOTS];
        } else {
            for e in self.head.saturating_add(1)..=epoch {
                if let Some(slot) = self.slots.get_mut(slot_of(e)) {
                    *slot = 0;
                }
            }
        }
        self.head = epoch;
    }

    /// Holds `amount` in the newest epoch (call [`Ring::advance`] first); returns that epoch,
    /// which the holder gives back to [`Ring::release`].
    pub fn hold(&mut self, amount: u64) -> u64 {
        if let Some(slot) = self.slots.get_mut(slot_of(self.head)) {
            *slot = slot.saturating_add(amount);
        }
        self.head
    }

    /// Releases `amount` taken in `epoch`; a holding whose epoch expired is already gone.
    pub fn release(&mut self, epoch: u64, amount: u64) {
        if self.is_live(epoch)
            && let Some(slot) = self.slots.get_mut(slot_of(epoch))
        {
            *slot = slot.saturating_sub(amount);
        }
    }

    pub fn is_live(&self, epoch: u64) -> bool {
        epoch <= self.head && self.head - epoch < SLOTS as u64
    }

    /// Everything held in live epochs.
    pub fn total(&self) -> u64 {
        self.slots.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head.to_le_bytes());
        for slot in &self.slots {
            out.extend_from_slice(&slot.to_le_bytes());
        }
    }

    /// Decodes [`RING_BYTES`] bytes; anything else reads as an empty ring.
    pub fn decode(bytes: &[u8]) -> Ring {
        let mut words = bytes
            .chunks_exact(8)
            .filter_map(|c| <[u8; 8]>::try_from(c).ok())
            .map(u64::from_le_bytes);
        if bytes.len() != RING_BYTES {
            return Ring::default();
        }
        let head = words.next().unwrap_or(0);
        let mut slots = [0; SLOTS];
        for (slot, word) in slots.iter_mut().zip(words) {
            *slot = word;
        }
        Ring { head, slots }
    }
}

fn slot_of(epoch: u64) -> usize {
    // SLOTS is small: the remainder always fits.
    usize::try_from(epoch % SLOTS as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_expire_after_the_ring_turns() {
        let mut r = Ring::default();
        r.advance(100);
        let e = r.hold(5);
        assert_eq!((e, r.total()), (100, 5));
        r.advance(107);
        assert_eq!(r.total(), 5, "still live seven epochs later");
        r.advance(108);
        assert_eq!(r.total(), 0, "expired once the ring turned past it");
        // A late settlement of the expired holding changes nothing.
        r.hold(3);
        r.release(e, 5);
        assert_eq!(r.total(), 3);
    }

    #[test]
    fn release_takes_from_the_epoch_it_was_held_in() {
        let mut r = Ring::default();
        r.advance(10);
        let a = r.hold(4);
        r.advance(12);
        let b = r.hold(6);
        r.release(a, 4);
        assert_eq!(r.total(), 6);
        r.advance(30);
        assert_eq!(r.total(), 0);
        r.release(b, 6);
        assert_eq!(r.total(), 0);
    }

    #[test]
    fn a_clock_behind_the_head_keeps_the_head() {
        let mut r = Ring::default();
        r.advance(50);
        r.advance(49);
        assert_eq!(r.hold(1), 50);
    }

    #[test]
    fn round_trip_and_garbage() {
        let mut r = Ring::default();
        r.advance(u64::MAX - 1);
        r.hold(u64::MAX);
        let mut out = Vec::new();
        r.encode_into(&mut out);
        assert_eq!(out.len(), RING_BYTES);
        assert_eq!(Ring::decode(&out), r);
        assert_eq!(Ring::decode(b"short"), Ring::default());
    }

    #[test]
    fn epoch_length_covers_the_ttl() {
        assert_eq!(epoch_ms_for_ttl(700_000), 100_000);
        assert_eq!(epoch_ms_for_ttl(0), 1);
        assert!(epoch_ms_for_ttl(600_000) * (SLOTS as u64 - 1) >= 600_000);
    }

    proptest::proptest! {
        /// Holdings released in any order, across any clock steps: the total is exactly what is
        /// held in epochs that are still live.
        #[test]
        fn total_is_what_live_epochs_hold(ops in proptest::collection::vec((0u64..4, 1u64..50, proptest::bool::ANY), 1..100)) {
            let mut r = Ring::default();
            let mut now = 1_000u64;
            let mut open: Vec<(u64, u64)> = Vec::new();
            for (step, amount, release) in ops {
                now += step;
                r.advance(now);
                if release && !open.is_empty() {
                    let (e, a) = open.remove(0);
                    r.release(e, a);
                } else {
                    open.push((r.hold(amount), amount));
                }
                let live: u64 = open.iter().filter(|(e, _)| now - e < SLOTS as u64).map(|(_, a)| a).sum();
                proptest::prop_assert_eq!(r.total(), live);
            }
        }
    }
}
