//! Which parents' cgroups are in place, so that a create makes only its
//! bubble's cgroup (its parent's cgroups and limit are made once, not on
//! every create).
//!
//! Each parent has a lock: a bubble's cgroup is made under it shared, a
//! parent's cgroups are made or removed under it exclusive. So a parent
//! cgroup is never removed between the check that it is in place and the
//! `mkdir` of a bubble's cgroup in it, and a parent's cgroup that is in
//! place always has its limit (it is made with it, exclusively). Parent
//! cgroups are removed only by [`Parents::sweep`] (a bubble's exit removes
//! its own cgroup only), once no bubble was made in them for a whole
//! [`GRACE`] and they are empty. Each broker starts with nothing in
//! place: the first create of each parent after a start writes the limit
//! of the current configuration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use super::CgroupError;

/// How often unused parent cgroups are looked for: one unused for a
/// whole period (so for 1–2 periods) is removed if empty.
pub const GRACE: Duration = Duration::from_secs(2);

/// How many times a create makes its parent's cgroups again when they
/// vanish under it (removed by hand: never by this broker while the
/// create holds the lock).
const ATTEMPTS: usize = 3;

static CACHE: AtomicBool = AtomicBool::new(true);

/// Sets, process-wide, whether a parent's cgroups are made once (the
/// default) or again on every create, as before they were kept (for the
/// bench's comparison).
pub fn set_parent_cache(on: bool) {
    CACHE.store(on, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Slot {
    /// Whether the parent's cgroups are in place, with their limit.
    ready: RwLock<bool>,
    /// Whether a bubble's cgroup was asked for since the last sweep.
    used: AtomicBool,
}

/// The parents of one broker's hierarchy (slots are never dropped: one
/// small entry per parent seen).
#[derive(Debug, Default)]
pub struct Parents {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

fn not_found(e: &CgroupError) -> bool {
    match e {
        CgroupError::Write { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        CgroupError::NotMounted | CgroupError::Task(_) | CgroupError::Gone => false,
    }
}

impl Parents {
    fn slot(&self, parent: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .entry(parent.to_string())
            .or_default()
            .clone()
    }

    /// Runs `bubble` (which makes a bubble's cgroup in `parent`'s) with
    /// `parent`'s cgroups in place, made by `make` first if they are not.
    pub fn with_parent<T>(
        &self,
        parent: &str,
        make: impl Fn() -> Result<(), CgroupError>,
        bubble: impl Fn() -> Result<T, CgroupError>,
    ) -> Result<T, CgroupError> {
        let slot = self.slot(parent);
        // Before the lock: a sweep that takes the lock after this never
        // removes the parent (see `sweep`).
        slot.used.store(true, Ordering::SeqCst);
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let ready = slot.ready.read();
            let held = if *ready && CACHE.load(Ordering::Relaxed) {
                ready
            } else {
                drop(ready);
                let mut ready = slot.ready.write();
                if !*ready || !CACHE.load(Ordering::Relaxed) {
                    make()?;
                    *ready = true;
                }
                // Still held: no sweep comes between.
                RwLockWriteGuard::downgrade(ready)
            };
            match bubble() {
                Err(e) if not_found(&e) => {
                    // Removed by hand: made again.
                    drop(held);
                    *slot.ready.write() = false;
                    last = Some(e);
                }
                done => return done,
            }
        }
        Err(last.unwrap_or(CgroupError::NotMounted))
    }

    /// Removes, with `remove` (true: gone), the cgroups of each parent in
    /// place or `on_disk` (a broker's re-adopted bubbles' parents) that
    /// no bubble's was asked for since the last sweep; how many went.
    pub fn sweep(&self, on_disk: &[String], remove: impl Fn(&str) -> bool) -> usize {
        let slots: Vec<(String, Arc<Slot>)> = {
            let mut all = self.slots.lock();
            for p in on_disk {
                all.entry(p.clone()).or_default();
            }
            all.iter()
                .filter(|(p, s)| *s.ready.read() || on_disk.contains(p))
                .map(|(p, s)| (p.clone(), s.clone()))
                .collect()
        };
        let mut removed = 0;
        for (parent, slot) in slots {
            if slot.used.swap(false, Ordering::SeqCst) {
                continue;
            }
            let mut ready = slot.ready.write();
            // Asked for since: that create waits for this lock and then
            // makes its bubble's cgroup in the parent's.
            if slot.used.load(Ordering::SeqCst) {
                continue;
            }
            // Whatever went, the next create makes it again, with its
            // limit.
            *ready = false;
            if remove(&parent) {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicUsize;

    fn io(path: &Path, e: std::io::Error) -> CgroupError {
        CgroupError::Write {
            path: path.to_path_buf(),
            source: e,
        }
    }

    /// A directory tree stands for a parent cgroup: `limit` is written
    /// only when the parent is made, and a bubble is made only inside an
    /// existing parent (no `mkdir -p`), checking the limit is there.
    struct Tree {
        root: tempfile::TempDir,
        makes: AtomicUsize,
        /// Bubbles whose parent was gone when they were made.
        misses: AtomicUsize,
    }

    impl Tree {
        fn parent(&self) -> PathBuf {
            self.root.path().join("p")
        }
        fn make(&self) -> Result<(), CgroupError> {
            self.makes.fetch_add(1, Ordering::SeqCst);
            let p = self.parent();
            match std::fs::create_dir(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(&p, e)),
                _ => {}
            }
            std::fs::write(p.join("limit"), b"1").map_err(|e| io(&p, e))
        }
        fn bubble(&self, n: usize) -> Result<PathBuf, CgroupError> {
            let b = self.parent().join(format!("b{n}"));
            std::fs::create_dir(&b).map_err(|e| {
                self.misses.fetch_add(1, Ordering::SeqCst);
                io(&b, e)
            })?;
            assert!(
                self.parent().join("limit").exists(),
                "a parent without its limit"
            );
            Ok(b)
        }
        fn remove(&self) -> bool {
            let p = self.parent();
            if std::fs::read_dir(&p).is_ok_and(|d| d.count() > 1) {
                return false; // a bubble in it: "busy"
            }
            std::fs::remove_dir_all(&p).is_ok()
        }
    }

    /// The parent is made once for any number of bubbles; a sweep keeps
    /// a parent used since the last one, removes an unused empty one, and
    /// the next create makes it again, with its limit.
    #[test]
    fn a_parent_is_made_once_and_swept_only_when_unused() {
        let t = Tree {
            root: tempfile::tempdir().unwrap(),
            makes: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        };
        let ps = Parents::default();
        for n in 0..5 {
            ps.with_parent("p", || t.make(), || t.bubble(n)).unwrap();
        }
        assert_eq!(t.makes.load(Ordering::SeqCst), 1);
        // Used since the last sweep: kept.
        assert_eq!(ps.sweep(&[], |_| t.remove()), 0);
        assert!(t.parent().exists());
        // Unused, but busy (a bubble in it): not removed.
        assert_eq!(ps.sweep(&[], |_| t.remove()), 0);
        for n in 0..5 {
            std::fs::remove_dir(t.parent().join(format!("b{n}"))).unwrap();
        }
        ps.with_parent("p", || t.make(), || t.bubble(9)).unwrap();
        std::fs::remove_dir(t.parent().join("b9")).unwrap();
        assert_eq!(
            ps.sweep(&[], |_| t.remove()),
            0,
            "used since the last sweep"
        );
        assert_eq!(ps.sweep(&[], |_| t.remove()), 1);
        assert!(!t.parent().exists());
        ps.with_parent("p", || t.make(), || t.bubble(10)).unwrap();
        assert_eq!(t.makes.load(Ordering::SeqCst), 3);
        // Removed by hand under the broker: made again.
        std::fs::remove_dir_all(t.parent()).unwrap();
        ps.with_parent("p", || t.make(), || t.bubble(11)).unwrap();
        assert_eq!(t.makes.load(Ordering::SeqCst), 4);
    }

    /// Creates of one parent racing a sweep that removes it whenever it
    /// can: every create finds its parent in place with its limit (the
    /// bubble's `mkdir` has no `-p`, so a parent removed in between fails
    /// it: counted, never seen), and the parent is made again after each
    /// removal.
    #[test]
    fn creates_racing_sweeps_always_find_their_parent() {
        let t = Arc::new(Tree {
            root: tempfile::tempdir().unwrap(),
            makes: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        });
        let ps = Arc::new(Parents::default());
        let stop = Arc::new(AtomicBool::new(false));
        let swept = {
            let (t, ps, stop) = (t.clone(), ps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += ps.sweep(&[], |_| t.remove());
                }
                n
            })
        };
        let makers: Vec<_> = (0..4)
            .map(|k| {
                let (t, ps) = (t.clone(), ps.clone());
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let n = k * 1000 + i;
                        let b = ps.with_parent("p", || t.make(), || t.bubble(n)).unwrap();
                        // The bubble exits: only its own cgroup goes.
                        std::fs::remove_dir(b).unwrap();
                    }
                })
            })
            .collect();
        for m in makers {
            m.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        let removed = swept.join().unwrap();
        assert!(
            removed > 0,
            "the sweep never removed the parent: no race ran"
        );
        assert!(t.makes.load(Ordering::SeqCst) >= removed);
        // Never removed under a create (then it would have been made
        // again and the create retried, hiding the race).
        assert_eq!(t.misses.load(Ordering::SeqCst), 0);
    }
}
