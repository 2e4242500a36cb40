//! A restarted broker kills the VMMs it could not re-adopt, by their
//! cgroup.
//!
//! A broker that dies leaves its VMMs running for the next one to
//! re-adopt. One it never recorded, or whose socket no longer answers,
//! cannot be reached through its socket: it would hold its memory (and,
//! without its socket, serve nobody) until the host reboots. Every VMM
//! runs in a bubble cgroup of its broker's hierarchy
//! (`<hierarchy>/<parent>/<bubble>.v<n>`), so the restarted broker kills
//! every process in those cgroups but the ones it re-adopted, then
//! removes the cgroups. Nothing outside its own hierarchy is ever
//! signalled, and each process is held by a pidfd before it is, so a
//! number reused meanwhile is never hit.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{remove, Cgroups};

/// What [`Cgroups::kill_strays`] did.
#[derive(Debug, Default)]
pub struct Strays {
    /// The processes it killed.
    pub killed: Vec<u32>,
    /// Those still running when it gave up waiting.
    pub surviving: Vec<u32>,
    /// The bubble cgroups it removed (directories).
    pub removed: Vec<PathBuf>,
    /// The bubble cgroups it could not remove.
    pub left: Vec<PathBuf>,
}

/// The processes listed in a `cgroup.procs` file.
fn pids_in(procs: &Path) -> Vec<u32> {
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether the process held by `fd` has exited (a pidfd is readable then).
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on our own stack, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) != 0 }
}

/// SIGKILL through a pidfd: never another process that took the number.
fn kill(fd: &OwnedFd) -> bool {
    // SAFETY: sends SIGKILL through a pidfd we own; no memory is passed
    // (null siginfo).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    rc == 0
}

impl Cgroups {
    /// The bubble cgroups of this broker's hierarchy (exactly two levels
    /// below it: `<parent>/<vmm>`) in every controller's tree.
    fn leaves(&self) -> Vec<PathBuf> {
        let dirs = |d: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        self.bases()
            .iter()
            .flat_map(|b| dirs(b))
            .flat_map(|p| dirs(&p))
            .collect()
    }

    /// Kills every process that runs in a bubble cgroup of this broker's
    /// hierarchy other than those the processes `keep` (the VMMs it
    /// re-adopted) run in, waits up to `patience` for them to exit, and
    /// removes those cgroups (and their parents' where left empty). Does
    /// nothing where this broker does not hold its hierarchy's claim: it
    /// could not tell its hierarchy from another broker's then.
    pub fn kill_strays(&self, keep: &[u32], patience: Duration) -> Strays {
        let mut out = Strays::default();
        if !self.owned {
            return out;
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .flat_map(|pid| self.of_process(*pid))
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        let leaves: Vec<PathBuf> = self
            .leaves()
            .into_iter()
            .filter(|l| !kept.contains(l))
            .collect();
        let mut held: Vec<(u32, OwnedFd)> = Vec::new();
        for leaf in &leaves {
            let procs = leaf.join("cgroup.procs");
            for pid in pids_in(&procs) {
                if keep.contains(&pid) || held.iter().any(|(p, _)| *p == pid) {
                    continue;
                }
                let Some(fd) = crate::linger::open(pid) else {
                    continue;
                };
                // Still listed there, and the process held still alive
                // after that read: the number named the process held.
                let listed = pids_in(&procs).contains(&pid);
                if !listed || exited(&fd) {
                    continue;
                }
                if kill(&fd) {
                    tracing::warn!(pid, cgroup = %leaf.display(), "killed a VMM no bubble of this broker owns");
                    out.killed.push(pid);
                    held.push((pid, fd));
                }
            }
        }
        let deadline = Instant::now() + patience;
        while held.iter().any(|(_, fd)| !exited(fd)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        out.surviving = held
            .iter()
            .filter(|(_, fd)| !exited(fd))
            .map(|(p, _)| *p)
            .collect();
        // One deadline for all (at least a moment after the kills): the
        // kernel may still count a task that has just been killed.
        let deadline = deadline.max(Instant::now() + Duration::from_millis(200));
        let mut pending = leaves;
        loop {
            pending.retain(|leaf| {
                remove(&[leaf.join("cgroup.procs")]);
                let gone = !leaf.exists();
                if gone {
                    out.removed.push(leaf.clone());
                }
                !gone
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        out.left = pending;
        out
    }
}
