//! Direct hand-off: a fetch that found nothing ready registers as a
//! waiter on its subject; a publish on that subject which finds a waiter
//! stores the event *already leased to it* (one delivery counted, hidden
//! until `ack_wait`), in the publish's own committed transaction, and
//! hands it over in memory after the commit. An event then costs no
//! separate lease commit and no scan of the queue, and the waiting worker
//! starts it as soon as its publish is durable.
//!
//! What can go wrong between the commit and the worker, and what happens:
//! - the waiting fetch was dropped (its worker stopped) before the event
//!   reached it: the publisher gets it back and releases the lease in a
//!   committed transaction (the delivery is uncounted; the event is ready
//!   again and other fetchers are woken);
//! - the broker dies before the release, or before the worker settles it:
//!   the event is durable and leased, so it comes back when its lease
//!   ends, exactly like an event a crashed broker had fetched.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::event::SourceEvent;

struct Waiter {
    id: u64,
    /// None: any subject.
    subject: Option<Arc<str>>,
    tx: oneshot::Sender<SourceEvent>,
}

/// The fetches waiting for events, oldest first.
#[derive(Default)]
pub(super) struct Waiters {
    next: u64,
    list: Vec<Waiter>,
}

/// A place to hand one event to: taken from the waiters by a publish.
pub(super) struct Slot(oneshot::Sender<SourceEvent>);

impl Slot {
    /// Hands `ev` over; gives it back if the fetch is gone.
    pub(super) fn hand(self, ev: SourceEvent) -> Result<(), SourceEvent> {
        self.0.send(ev)
    }
}

fn lock(m: &Mutex<Waiters>) -> MutexGuard<'_, Waiters> {
    // A panic while holding this lock leaves a list that is still whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Waiters {
    /// Registers a waiter for `subject`.
    pub(super) fn register(
        m: &Mutex<Waiters>,
        subject: Option<Arc<str>>,
    ) -> (u64, oneshot::Receiver<SourceEvent>) {
        let (tx, rx) = oneshot::channel();
        let mut w = lock(m);
        w.next += 1;
        let id = w.next;
        w.list.push(Waiter { id, subject, tx });
        (id, rx)
    }

    /// Removes waiter `id` (if a publish has not taken it).
    pub(super) fn remove(m: &Mutex<Waiters>, id: u64) {
        lock(m).list.retain(|w| w.id != id);
    }

    /// How many fetches wait now.
    pub(super) fn count(m: &Mutex<Waiters>) -> usize {
        lock(m).list.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Takes the oldest live waiter for `subject` (dropping dead ones).
    pub(super) fn take(m: &Mutex<Waiters>, subject: &str) -> Option<Slot> {
        let mut w = lock(m);
        w.list.retain(|w| !w.tx.is_closed());
        let i = w
            .list
            .iter()
            .position(|w| w.subject.as_deref().is_none_or(|s| s == subject))?;
        Some(Slot(w.list.remove(i).tx))
    }
}
