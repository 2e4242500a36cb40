//! Bounds on awaits: at most `events.max_awaits_per_owner` live awaits
//! per parent frozen by this broker (counted in its registry plus the
//! freezes in flight, under one lock, so concurrent awaits cannot pass
//! the cap together).

use std::collections::HashMap;

use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::awaits::AwaitPhase;

/// Freezes in flight per owner (not yet in the registry).
#[derive(Default)]
pub(crate) struct AwaitSlots(parking_lot::Mutex<HashMap<String, usize>>);

/// One reserved await slot of an owner, given back when dropped (by then
/// the await is in the registry, or it failed).
pub(super) struct Slot<'a> {
    slots: &'a AwaitSlots,
    owner: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock();
        if let Some(n) = m.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.owner);
            }
        }
    }
}

impl Broker {
    /// Reserves an await slot for `owner`, or refuses with
    /// [`BrokerError::AwaitLimit`] when its live awaits here (registry,
    /// not ended) and freezes in flight reach the limit.
    pub(super) fn reserve_await(&self, owner: &str) -> Result<Slot<'_>, BrokerError> {
        let limit = self.cfg.events.max_awaits_per_owner;
        let mut m = self.await_slots.0.lock();
        let recorded = self
            .registry
            .awaits()?
            .iter()
            .filter(|a| a.owner == owner && a.phase != AwaitPhase::Ended)
            .count();
        let in_flight = m.get(owner).copied().unwrap_or(0);
        if recorded + in_flight >= limit {
            return Err(BrokerError::AwaitLimit { limit });
        }
        *m.entry(owner.to_string()).or_default() += 1;
        Ok(Slot {
            slots: &self.await_slots,
            owner: owner.to_string(),
        })
    }
}
