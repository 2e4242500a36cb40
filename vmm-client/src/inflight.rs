//! Requests in flight over all VMMs of this process (see
//! [`crate::set_answer_poll`]).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests awaiting a VMM's answer, over all VMMs of this process.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a request in flight until dropped.
pub(crate) struct InFlight(usize);

impl InFlight {
    pub(crate) fn enter() -> Self {
        InFlight(IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// No other request was in flight when this one started.
    pub(crate) fn alone(&self) -> bool {
        self.0 == 1
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}
