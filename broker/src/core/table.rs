//! The broker's table of bubbles: each bubble's record and its running VMM
//! in one entry, and the bubble's *gate*, which every operation that
//! changes the bubble holds for its whole length.
//!
//! A [`Permit`] is the gate held, with the record and VMM as they were when
//! the gate was taken. Calls, suspend, restore, delete and idle maintenance
//! all take one, so they run one at a time per bubble, in arrival order,
//! and each re-checks the state it acts on: a call queued behind a suspend
//! finds the bubble SUSPENDED and is refused; the second of two restores
//! finds it READY. Only failures (a VMM dying) change an entry without the
//! gate, and they can only move a bubble to FAILED.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{Mutex as Gate, OwnedMutexGuard};

use crate::store::registry::BubbleRecord;
use crate::vmm::Vmm;

/// A running VMM process and which instance it is.
pub(crate) struct Live {
    /// The process.
    pub vmm: Vmm,
    /// Broker-wide serial number of this VMM instance: a bubble that is
    /// suspended and restored gets a new one, so notices of the old VMM
    /// can be told apart from the current one's.
    pub instance: u64,
}

/// One bubble.
pub(crate) struct Entry {
    pub rec: BubbleRecord,
    pub live: Option<Arc<Live>>,
    gate: Arc<Gate<()>>,
}

/// The gate of one bubble, held, with what the entry held when it was taken.
pub(crate) struct Permit {
    _held: OwnedMutexGuard<()>,
    /// The record as it was once the gate was taken.
    pub rec: BubbleRecord,
    /// The VMM running then, if any.
    pub live: Option<Arc<Live>>,
}

/// Every bubble the broker knows, by id.
#[derive(Default)]
pub(crate) struct Table {
    entries: parking_lot::Mutex<HashMap<String, Entry>>,
    instances: AtomicU64,
}

impl Table {
    /// A table of the records read from the registry (no VMM yet).
    pub fn from_records(recs: Vec<BubbleRecord>) -> Self {
        let t = Self::default();
        {
            let mut m = t.entries.lock();
            for r in recs {
                m.insert(
                    r.id.clone(),
                    Entry {
                        rec: r,
                        live: None,
                        gate: Arc::default(),
                    },
                );
            }
        }
        t
    }

    /// Wraps a freshly started VMM with a new instance number.
    pub fn live(&self, vmm: Vmm) -> Arc<Live> {
        Arc::new(Live {
            vmm,
            instance: self.instances.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// A copy of one record.
    pub fn get(&self, id: &str) -> Option<BubbleRecord> {
        self.entries.lock().get(id).map(|e| e.rec.clone())
    }

    /// The running VMM of a bubble.
    pub fn live_of(&self, id: &str) -> Option<Arc<Live>> {
        self.entries.lock().get(id).and_then(|e| e.live.clone())
    }

    /// Whether `instance` is still the bubble's running VMM.
    pub fn is_current(&self, id: &str, instance: u64) -> bool {
        self.entries
            .lock()
            .get(id)
            .and_then(|e| e.live.as_ref())
            .is_some_and(|l| l.instance == instance)
    }

    /// Runs `f` on the whole table under its lock (admission, pools,
    /// listing): keep it short and never await inside.
    pub fn with<R>(&self, f: impl FnOnce(&mut TableView<'_>) -> R) -> R {
        let mut m = self.entries.lock();
        f(&mut TableView { m: &mut m })
    }

    /// Sets or clears the running VMM; returns the previous one.
    pub fn set_live(&self, id: &str, live: Option<Arc<Live>>) -> Option<Arc<Live>> {
        let mut m = self.entries.lock();
        let e = m.get_mut(id)?;
        std::mem::replace(&mut e.live, live)
    }

    /// Takes the bubble's gate (waiting behind operations already holding
    /// or queued for it), then reads its entry.
    pub async fn permit(&self, id: &str) -> Option<Permit> {
        let gate = self.entries.lock().get(id).map(|e| e.gate.clone())?;
        let held = gate.lock_owned().await;
        let m = self.entries.lock();
        let e = m.get(id)?;
        Some(Permit {
            _held: held,
            rec: e.rec.clone(),
            live: e.live.clone(),
        })
    }

    /// Removes bubbles from memory (a create that was never recorded, or
    /// records collected after their retention).
    pub fn remove(&self, ids: &[String]) {
        let mut m = self.entries.lock();
        for id in ids {
            m.remove(id);
        }
    }

    /// Every running VMM, taken out of the table (broker shutdown).
    pub fn drain_live(&self) -> Vec<Arc<Live>> {
        self.entries
            .lock()
            .values_mut()
            .filter_map(|e| e.live.take())
            .collect()
    }
}

/// The table under its lock.
pub(crate) struct TableView<'a> {
    m: &'a mut HashMap<String, Entry>,
}

impl TableView<'_> {
    /// Every record.
    pub fn records(&self) -> impl Iterator<Item = &BubbleRecord> {
        self.m.values().map(|e| &e.rec)
    }

    /// One record.
    pub fn record(&self, id: &str) -> Option<&BubbleRecord> {
        self.m.get(id).map(|e| &e.rec)
    }

    /// One record, to change in place (the caller persists it).
    pub fn record_mut(&mut self, id: &str) -> Option<&mut BubbleRecord> {
        self.m.get_mut(id).map(|e| &mut e.rec)
    }

    /// Inserts a new bubble with its gate already held by the caller (the
    /// create path holds it until the bubble is READY or FAILED).
    /// Returns `None` if the id exists.
    pub fn insert_held(&mut self, rec: BubbleRecord) -> Option<Permit> {
        if self.m.contains_key(&rec.id) {
            return None;
        }
        let gate: Arc<Gate<()>> = Arc::default();
        let held = gate.clone().try_lock_owned().ok()?;
        self.m.insert(
            rec.id.clone(),
            Entry {
                rec: rec.clone(),
                live: None,
                gate,
            },
        );
        Some(Permit {
            _held: held,
            rec,
            live: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::State;

    fn rec(id: &str) -> BubbleRecord {
        BubbleRecord {
            id: id.into(),
            owner: "p".into(),
            client_request_id: "r".into(),
            state: State::Ready,
            failure_reason: String::new(),
            failure_kind: String::new(),
            memory_mib: 16,
            vcpus: 1,
            image: "shim".into(),
            created_at_ms: 0,
            boot_us: 0,
            vmm_pid: 0,
            calls: 0,
            profile: String::new(),
            idle: Default::default(),
            last_active_ms: 0,
            usage: Default::default(),
            policy: Default::default(),
            portions: Vec::new(),
            generation: 0,
            frozen: None,
            ended_at_ms: 0,
            parent_keyed: false,
            jail_warning: String::new(),
        }
    }

    #[tokio::test]
    async fn permits_are_exclusive_and_in_arrival_order() {
        let t = Arc::new(Table::from_records(vec![rec("a")]));
        let first = t.permit("a").await.expect("known");
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..8 {
            let (t, order) = (t.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _p = t.permit("a").await.expect("known");
                order.lock().push(i);
            }));
            // Each waiter is queued before the next one starts.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        }
        assert!(order.lock().is_empty(), "nobody passes a held gate");
        drop(first);
        for w in waiters {
            w.await.expect("waiter");
        }
        assert_eq!(*order.lock(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_permit_sees_changes_made_before_it_was_granted() {
        let t = Table::from_records(vec![rec("a")]);
        let p = t.permit("a").await.expect("known");
        t.with(|v| v.record_mut("a").expect("a").state = State::Suspended);
        drop(p);
        assert_eq!(
            t.permit("a").await.expect("known").rec.state,
            State::Suspended
        );
        assert!(t.permit("b").await.is_none());
    }

    #[test]
    fn insert_held_refuses_a_known_id() {
        let t = Table::from_records(vec![rec("a")]);
        assert!(t.with(|v| v.insert_held(rec("a"))).is_none());
        let p = t.with(|v| v.insert_held(rec("b"))).expect("new");
        assert_eq!(p.rec.id, "b");
        t.remove(&["b".into()]);
        assert!(t.get("b").is_none());
    }
}
