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

/// The memory cgroup directory of a spawned VMM, set once it is placed
/// there: its reaper reads the cgroup's OOM-kill count to tell a memory
/// limit kill from another SIGKILL.
pub(crate) type MemcgSlot = std::sync::Arc<std::sync::OnceLock<std::path::PathBuf>>;

/// The exit of a spawned VMM, once its reaper has it.
pub(crate) type ExitWatch = watch::Receiver<Option<VmmExit>>;
