//! How a VMM process ended, as the broker sees it.

use bubble_vmm::control::{FailureKind, FailureReason};
use tokio::sync::watch;

/// How a VMM process ended, as far as the broker can tell: exit statuses
/// are known for VMMs this process spawned, not for re-adopted ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmmExit {
    /// The kernel killed it for a system call outside its seccomp
    /// allowlist (SIGSYS).
    #[error("VMM killed by seccomp: a system call outside its allowlist (SIGSYS)")]
    Seccomp,
    /// The kernel's OOM killer ended it: its cgroup's memory limit was
    /// reached (guest memory plus the VMM's own; see `docs/jail.md`).
    #[error("VMM killed by the kernel: its cgroup's memory limit was reached")]
    MemoryLimit,
    /// Killed by another signal.
    #[error("VMM killed by signal {0}")]
    Signal(i32),
    /// Exited with this code.
    #[error("VMM exited with code {0}")]
    Code(i32),
    /// Its connection closed and no exit status is known.
    #[error("{0}")]
    Closed(String),
}

impl VmmExit {
    /// Classifies an exit status.
    pub fn from_status(st: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (st.signal(), st.code()) {
            (Some(libc::SIGSYS), _) => VmmExit::Seccomp,
            (Some(sig), _) => VmmExit::Signal(sig),
            (None, Some(code)) => VmmExit::Code(code),
            (None, None) => VmmExit::Closed(format!("VMM ended: {st}")),
        }
    }
}

impl VmmExit {
    /// The failure this exit stands for, if it ends a bubble.
    pub fn reason(&self) -> FailureReason {
        let kind = match self {
            VmmExit::Seccomp => FailureKind::Seccomp,
            VmmExit::MemoryLimit => FailureKind::MemoryLimit,
            VmmExit::Signal(_) => FailureKind::VmmKilled,
            VmmExit::Code(_) | VmmExit::Closed(_) => FailureKind::VmmExited,
        };
        FailureReason::new(kind, self.to_string())
    }
}

/// The bubble cgroups a spawned VMM runs in (their `cgroup.procs` files,
/// the memory controller's first), set once it is placed there: its
/// reaper reads the memory cgroup's OOM-kill count to tell a memory limit
/// kill from another SIGKILL, and removes them once it has exited. A
/// pooled bubble's VMM moved under the parent that attached it has them
/// replaced (see `cgroups::moving`).
#[derive(Clone, Debug, Default)]
pub(crate) struct MemcgSlot(std::sync::Arc<parking_lot::Mutex<Vec<std::path::PathBuf>>>);

impl MemcgSlot {
    /// Records the cgroups the VMM now runs in; the ones it had.
    pub(crate) fn set(&self, procs: Vec<std::path::PathBuf>) -> Vec<std::path::PathBuf> {
        std::mem::replace(&mut *self.0.lock(), procs)
    }

    /// The cgroups the VMM runs in (empty: none).
    pub(crate) fn procs(&self) -> Vec<std::path::PathBuf> {
        self.0.lock().clone()
    }

    /// Its memory cgroup's directory.
    pub(crate) fn memory_dir(&self) -> Option<std::path::PathBuf> {
        self.0
            .lock()
            .first()?
            .parent()
            .map(std::path::Path::to_path_buf)
    }
}

/// The exit of a spawned VMM, once its reaper has it.
pub(crate) type ExitWatch = watch::Receiver<Option<VmmExit>>;
