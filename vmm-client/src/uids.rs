//! A uid (and gid of the same number) of its own for every live VMM,
//! from a configured range, when the broker is root.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

/// Where jailed VMMs get their ids from (see `docs/jail.md`).
#[derive(Debug)]
pub struct UidPool {
    lo: u32,
    hi: u32,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Next id to try (round robin: an id just freed is reused last).
    next: u32,
    /// Ids held by a live VMM (or found in use when the pool was made).
    taken: HashSet<u32>,
}

/// One VMM's id; given back when dropped (after that VMM is reaped).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    pool: Arc<UidPool>,
}

impl UidLease {
    /// The uid (also the gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut s = self.pool.state.lock();
        s.taken.remove(&self.uid);
    }
}

impl UidPool {
    /// A pool of the ids `lo..=hi`. Ids some process already runs as
    /// (e.g. VMMs of a previous broker that still run, to be re-adopted)
    /// are never handed out.
    pub fn new(lo: u32, hi: u32) -> Arc<Self> {
        let taken = uids_in_use(lo, hi);
        Arc::new(Self {
            lo,
            hi,
            state: Mutex::new(PoolState { next: lo, taken }),
        })
    }

    /// An id no live VMM has; `None` when all are taken.
    pub fn lease(self: &Arc<Self>) -> Option<UidLease> {
        let mut s = self.state.lock();
        let span = u64::from(self.hi - self.lo) + 1;
        for _ in 0..span {
            let uid = s.next;
            s.next = if uid >= self.hi { self.lo } else { uid + 1 };
            if s.taken.insert(uid) {
                return Some(UidLease {
                    uid,
                    pool: self.clone(),
                });
            }
        }
        None
    }

    /// Whether a re-adopted VMM's socket peer `uid` is one a VMM of this
    /// pool may have: in the range and not leased to a VMM this broker
    /// started. It stays taken from then on.
    pub fn adopt(&self, uid: u32) -> bool {
        if uid < self.lo || uid > self.hi {
            return false;
        }
        let mut s = self.state.lock();
        // Found in use at start-up, or new: either way this VMM's now.
        s.taken.insert(uid);
        true
    }
}

/// Real uids in `lo..=hi` of the processes running now.
fn uids_in_use(lo: u32, hi: u32) -> HashSet<u32> {
    let mut found = HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(u) = uid.filter(|u| (lo..=hi).contains(u)) {
            found.insert(u);
        }
    }
    found
}
