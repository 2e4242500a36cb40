//! Removing the cgroups that brokers left behind.
//!
//! A broker removes a bubble's cgroups once its VMM has exited; a broker
//! that is killed, or whose VMMs are killed after it, leaves them. Each
//! broker therefore claims its hierarchy's name while it runs (an `flock`
//! on `/run/bubbled/cgroups/<name>`), and at start removes the empty
//! cgroups of its own hierarchy and of every `bubbled-*` hierarchy that no
//! running broker claims. Only empty cgroups go: `rmdir` refuses a cgroup
//! that still has a process or a child, so a VMM that outlived its broker
//! (waiting to be re-adopted) keeps its cgroup.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where brokers of one host claim their cgroup hierarchies.
pub const HOST_CLAIMS: &str = "/run/bubbled/cgroups";

/// A broker's claim on its hierarchy, held while it lives.
#[derive(Debug)]
pub struct HierarchyClaim {
    _file: File,
}

fn lock_path(name: &str) -> PathBuf {
    Path::new(HOST_CLAIMS).join(name)
}

fn open_lock(path: &Path) -> Option<File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(HOST_CLAIMS)
        .ok()?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .ok()
}

/// Locks `path` (waiting if `wait`) and checks that the file locked is
/// still the one at `path`: a sweeper unlinks the lock file of a
/// hierarchy it removed while holding the lock, and a lock on an unlinked
/// file guards nothing.
fn lock(path: &Path, wait: bool) -> Option<File> {
    for _ in 0..8 {
        let f = open_lock(path)?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return None;
        }
        let same = match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        if same {
            return Some(f);
        }
    }
    None
}

/// Claims hierarchy `name` for this broker, waiting while a sweeper
/// holds it; `None` where the claim directory cannot be used (then no
/// other broker sweeps anything, see [`sweep_stale`]).
pub fn claim(name: &str) -> Option<HierarchyClaim> {
    lock(&lock_path(name), true).map(|f| HierarchyClaim { _file: f })
}

/// Removes the empty cgroups under `dir`, deepest first, and `dir` itself
/// if it is left empty; whether `dir` is gone.
pub fn remove_empty(dir: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty(&e.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Sweeps the hierarchies named `bubbled-*` under `roots` (one per
/// controller on cgroup v1, the unified root on v2), but `own`, that no
/// running broker claims: their empty cgroups are removed, and the claim
/// file of one removed entirely. Returns how many hierarchies were
/// removed entirely. Does nothing where claims cannot be taken (a broker
/// that is not root), since a live broker's hierarchy could not be told
/// from a dead one's.
pub fn sweep_stale(roots: &[PathBuf], own: &str) -> usize {
    if open_lock(&lock_path(own)).is_none() {
        return 0;
    }
    let mut names: Vec<String> = roots
        .iter()
        .filter_map(|r| std::fs::read_dir(r).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("bubbled-") && n != own)
        .collect();
    names.sort();
    names.dedup();
    let mut removed = 0;
    for name in names {
        let path = lock_path(&name);
        // Held by a running broker (or another sweeper): not ours.
        let Some(_held) = lock(&path, false) else {
            continue;
        };
        // Every controller's tree is swept, even after one kept a cgroup.
        let kept = roots
            .iter()
            .filter(|r| !remove_empty(&r.join(&name)))
            .count();
        let gone = kept == 0;
        if gone {
            // Unlinked while held: a broker waiting for this lock finds
            // the file replaced and takes a new one (see [`lock`]).
            let _ = std::fs::remove_file(&path);
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hierarchy claimed by a running broker is never swept; an
    /// unclaimed one is, empty directories only (here a plain directory
    /// tree stands for a cgroup hierarchy).
    #[test]
    fn only_unclaimed_hierarchies_lose_their_empty_directories() {
        if open_lock(&lock_path("bubbled-unit-probe")).is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{HOST_CLAIMS} not writable under CI"
            );
            eprintln!("NOT RUN: {HOST_CLAIMS} not writable");
            return;
        }
        let _ = std::fs::remove_file(lock_path("bubbled-unit-probe"));
        let root = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let (live, dead, own) = (
            format!("bubbled-unit-live-{pid}"),
            format!("bubbled-unit-dead-{pid}"),
            format!("bubbled-unit-own-{pid}"),
        );
        for n in [&live, &dead, &own] {
            std::fs::create_dir_all(root.path().join(n).join("p-1/b.v0")).unwrap();
        }
        // A non-empty cgroup stands for one with a process in it.
        let busy = root.path().join(&dead).join("p-1/b.v1");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("tasks"), b"1").unwrap();
        let held = claim(&live).unwrap();
        let n = sweep_stale(&[root.path().to_path_buf()], &own);
        assert_eq!(n, 0, "the dead hierarchy still has a busy cgroup");
        assert!(root.path().join(&live).join("p-1/b.v0").exists());
        assert!(root.path().join(&own).join("p-1/b.v0").exists());
        assert!(!root.path().join(&dead).join("p-1/b.v0").exists());
        assert!(busy.exists());
        // Now empty: removed entirely, with its claim file.
        std::fs::remove_file(busy.join("tasks")).unwrap();
        assert_eq!(sweep_stale(&[root.path().to_path_buf()], &own), 1);
        assert!(!root.path().join(&dead).exists());
        assert!(!lock_path(&dead).exists());
        drop(held);
        // Released: the live one's broker is gone now, and so is it.
        assert_eq!(sweep_stale(&[root.path().to_path_buf()], &own), 1);
        assert!(!root.path().join(&live).exists());
        let _ = std::fs::remove_file(lock_path(&own));
    }
}
