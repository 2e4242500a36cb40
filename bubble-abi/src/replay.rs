//! The replay window of sealed inputs: which sequence numbers (the per-call
//! nonces of `portion_sealed`) a bubble still accepts.
//!
//! The window is a floor and the set of sequence numbers accepted above
//! it, at most [`REPLAY_WINDOW`] of them. A number is accepted once, if it
//! is above the floor and not in the set; when the set outgrows the window
//! its smallest number is dropped and becomes the new floor, so the state
//! is bounded (about [`REPLAY_WINDOW`] × 8 bytes plus the set's nodes) and
//! nothing at or below the floor is ever accepted again. Senders choose
//! `seq = max(last + 1, now in ns)` (the client library does), so callers
//! that share a bubble interleave by time; a call that arrives after
//! [`REPLAY_WINDOW`] later-numbered calls is refused and may be re-sealed
//! with a fresh number (it never ran).
//!
//! The window lives in guest memory, so it is part of a suspended
//! bubble's frozen copy and survives suspend and restore; a copy restores
//! once (its generation is claimed), so an older window cannot come back.

use alloc::collections::BTreeSet;

/// Most sequence numbers remembered above the floor.
pub const REPLAY_WINDOW: usize = 1024;

/// A sequence number that was used already or is at or below the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replayed;

/// The sequence numbers a bubble still accepts (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    floor: u64,
    seen: BTreeSet<u64>,
}

impl ReplayWindow {
    /// An empty window (floor 0: sequence number 0 is never accepted).
    pub const fn new() -> Self {
        Self {
            floor: 0,
            seen: BTreeSet::new(),
        }
    }

    /// Whether `seq` would be accepted now (nothing changes).
    pub fn check(&self, seq: u64) -> Result<(), Replayed> {
        if seq <= self.floor || self.seen.contains(&seq) {
            Err(Replayed)
        } else {
            Ok(())
        }
    }

    /// Accepts `seq` once: records it, raising the floor if the window is
    /// full. Call only after the sealed input authenticated, so that no
    /// one but the sealer can move the window.
    pub fn accept(&mut self, seq: u64) -> Result<(), Replayed> {
        self.check(seq)?;
        self.seen.insert(seq);
        if self.seen.len() > REPLAY_WINDOW {
            if let Some(lowest) = self.seen.pop_first() {
                self.floor = lowest;
            }
        }
        Ok(())
    }

    /// The floor: nothing at or below it is accepted.
    pub fn floor(&self) -> u64 {
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_accepted_once_and_zero_never() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Err(Replayed));
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(5), Err(Replayed));
        // Out of order inside the window is fine.
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(Replayed));
        assert_eq!(w.check(4), Ok(()));
    }

    #[test]
    fn the_state_is_bounded_and_the_floor_only_rises() {
        let mut w = ReplayWindow::new();
        for s in 1..=(REPLAY_WINDOW as u64 * 3) {
            assert_eq!(w.accept(s), Ok(()));
            assert!(w.seen.len() <= REPLAY_WINDOW);
        }
        let floor = w.floor();
        assert_eq!(floor, REPLAY_WINDOW as u64 * 2);
        // Everything at or below the floor, seen or not, is refused.
        assert_eq!(w.accept(floor), Err(Replayed));
        assert_eq!(w.accept(1), Err(Replayed));
        // Two senders numbering by time interleave and keep working, even
        // with their calls reordered by a few places.
        let t0 = 1u64 << 40;
        for i in 0..(REPLAY_WINDOW as u64 * 4) {
            let (a, b) = (t0 + 10 * i + 3, t0 + 10 * i + 1);
            assert_eq!(w.accept(a), Ok(()));
            assert_eq!(w.accept(b), Ok(()));
        }
        // A sender whose numbers lag a window behind is refused (it
        // re-seals with a fresh number).
        assert_eq!(w.accept(t0 + 5), Err(Replayed));
        assert!(w.floor() >= floor);
    }
}
