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
    /// Host-wide claims on the ids of re-adopted VMMs (see [`claim`]).
    adopted: std::collections::HashMap<u32, std::fs::File>,
}

/// One VMM's id; given back when dropped (after that VMM is reaped).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    pool: Arc<UidPool>,
    /// The host-wide claim on the id (see [`HOST_LOCKS`]), released with
    /// the lease.
    _claim: Option<std::fs::File>,
}

/// Where brokers of one host claim ids (a lock file per id, held while
/// the id is lent): two brokers on one host (tests run many) with the same
/// range must never lend one id at once. Two VMMs sharing a uid would
/// share its `RLIMIT_NPROC` (threads counted per uid host-wide) and fail
/// to start threads, and could signal each other.
pub const HOST_LOCKS: &str = "/run/bubbled/uids";

/// Claims `uid` host-wide: `None` if another broker holds it; `Some(None)`
/// where the lock directory cannot be used (then only this broker's own
/// bookkeeping guards the id).
fn claim(uid: u32) -> Option<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = std::path::Path::new(HOST_LOCKS);
    if std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .is_err()
    {
        return Some(None);
    }
    let path = dir.join(uid.to_string());
    // Made if missing, then opened read-only for the lock: a VMM holding
    // the descriptor (see [`UidLease::inheritable`]) cannot write to it.
    let made = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path);
    let Ok(f) = made.and_then(|_| std::fs::File::open(&path)) else {
        return Some(None);
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(Some(f))
}

impl UidLease {
    /// The uid (also the gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// A copy of the host-wide claim's descriptor that a spawned VMM
    /// inherits (not close-on-exec) and keeps for its whole life: the lock
    /// belongs to the open file, so the uid stays claimed while that VMM
    /// runs, even after this broker is gone (another broker of the host,
    /// started before this VMM was, would otherwise lend its uid again).
    /// Drop it once the VMM is spawned. `None` without a claim.
    pub fn inheritable(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let f = self._claim.as_ref()?;
        // SAFETY: F_DUPFD duplicates a descriptor we own into a new one
        // (without FD_CLOEXEC); no memory is passed.
        let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD, 3) };
        // SAFETY: on success `fd` is a new descriptor owned by nobody else.
        (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
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
            state: Mutex::new(PoolState {
                next: lo,
                taken,
                adopted: Default::default(),
            }),
        })
    }

    /// An id no live VMM has; `None` when all are taken.
    pub fn lease(self: &Arc<Self>) -> Option<UidLease> {
        let mut s = self.state.lock();
        let span = u64::from(self.hi - self.lo) + 1;
        for _ in 0..span {
            let uid = s.next;
            s.next = if uid >= self.hi { self.lo } else { uid + 1 };
            if s.taken.contains(&uid) {
                continue;
            }
            // Held by another broker of this host: skip it.
            let Some(claim) = claim(uid) else { continue };
            s.taken.insert(uid);
            return Some(UidLease {
                uid,
                pool: self.clone(),
                _claim: claim,
            });
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
        // Found in use at start-up, or new: either way this VMM's now, and
        // claimed host-wide for as long as this broker runs (another
        // broker of the host must not lend it meanwhile).
        s.taken.insert(uid);
        if let std::collections::hash_map::Entry::Vacant(e) = s.adopted.entry(uid) {
            if let Some(Some(f)) = claim(uid) {
                e.insert(f);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two brokers of one host with one range never lend one id at once
    /// (where the host-wide lock directory can be used, as in CI: root).
    #[test]
    fn two_pools_on_one_host_lend_disjoint_ids() {
        if std::fs::create_dir_all(HOST_LOCKS).is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{HOST_LOCKS} not writable under CI"
            );
            eprintln!("NOT RUN: {HOST_LOCKS} not writable");
            return;
        }
        // A range of its own, far from the default, so that other tests'
        // brokers do not hold these ids.
        let (lo, hi) = (4_000_000_000u32 - 64, 4_000_000_000 - 1);
        let a = UidPool::new(lo, hi);
        let b = UidPool::new(lo, hi);
        let la: Vec<_> = (0..24).map(|_| a.lease().unwrap()).collect();
        let lb: Vec<_> = (0..24).map(|_| b.lease().unwrap()).collect();
        let ids_a: HashSet<u32> = la.iter().map(UidLease::uid).collect();
        let ids_b: HashSet<u32> = lb.iter().map(UidLease::uid).collect();
        assert_eq!(ids_a.len(), 24);
        assert!(ids_a.is_disjoint(&ids_b), "{ids_a:?} / {ids_b:?}");
        // 48 of 64 lent: 16 left for either, then none.
        let rest: Vec<_> = std::iter::from_fn(|| a.lease()).collect();
        assert_eq!(rest.len(), 16);
        assert!(b.lease().is_none());
        // Given back: the other pool may lend it.
        drop(la);
        assert!(b.lease().is_some());
    }
}
