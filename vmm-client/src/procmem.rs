//! Which process a restore writes guest memory into, held so that its
//! bytes can never reach another process that took the VMM's pid.
//!
//! A VMM's pid is not ours to keep: a jailed VMM is reaped by its own
//! spawner, and a re-adopted one by init, so once it dies its number can
//! be given to any new process on the host. Writing by raw pid
//! (`process_vm_writev`) could then land in that process. Instead:
//!
//! - the client holds a **pidfd** of the VMM from the moment it connects
//!   (`SO_PEERPIDFD` on the control socket: the kernel's handle on the
//!   process listening there, whatever happens to its number; on kernels
//!   without it, `pidfd_open` of the peer's pid right after connecting);
//! - a restore opens the VMM's `/proc/<pid>/mem` once and then checks,
//!   through the pidfd, that the VMM has not exited: a process that is
//!   still alive held its pid all along, so the file opened is its memory.
//!   The open file is bound to that process's address space, not to the
//!   number: if the VMM dies afterwards, a write through it fails (the
//!   address space is gone) and writes nothing anywhere.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

/// Why pages could not be written into a VMM directly.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The snapshot is malformed.
    #[error("snapshot does not decode: {0}")]
    Snapshot(String),
    /// The kernel refused (or wrote short); the caller streams instead.
    #[error("writing guest memory refused: {0}")]
    Refused(std::io::Error),
    /// The VMM process has exited: nothing more is written (and nothing
    /// went to a process that took its pid).
    #[error("the VMM process has exited")]
    Gone,
}

/// A handle on one VMM process: its pid and a pidfd for it.
#[derive(Clone, Debug)]
pub struct ProcHandle {
    pid: u32,
    pidfd: Option<Arc<OwnedFd>>,
}

impl ProcHandle {
    /// The process listening on the other end of `sock` (a VMM's control
    /// socket), whose pid the kernel gave as `pid`.
    pub(crate) fn of_peer(sock: &impl AsFd, pid: u32) -> Self {
        use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
        let pidfd = match getsockopt(sock, PeerPidfd) {
            Ok(fd) if pid_of(&fd) == Some(pid) => Some(fd),
            // The socket's peer is not the process named `pid` (it went,
            // and the number may be another's now): no handle, so writes
            // take the socket path, never a pid that could be reused.
            Ok(_) => None,
            // A kernel without SO_PEERPIDFD (before 6.5): the pid, opened
            // just after the connection that named it.
            Err(_) => crate::linger::open(pid),
        };
        Self {
            pid,
            pidfd: pidfd.map(Arc::new),
        }
    }

    /// A handle on this very process (for tests of the writers).
    pub fn this_process() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            pidfd: crate::linger::open(pid).map(Arc::new),
        }
    }

    /// A handle on child process `child` (for tests).
    pub fn of_child(child: &std::process::Child) -> Self {
        Self {
            pid: child.id(),
            pidfd: crate::linger::open(child.id()).map(Arc::new),
        }
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (or was never held).
    pub fn exited(&self) -> bool {
        let Some(fd) = &self.pidfd else {
            return true;
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on our own stack, zero timeout. A pidfd is
        // readable once its process has exited.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n != 0
    }

    /// A new descriptor for the pidfd held (for a watcher that outlives
    /// this handle).
    pub(crate) fn pidfd(&self) -> Option<OwnedFd> {
        self.pidfd.as_ref()?.try_clone().ok()
    }

    /// Sends SIGKILL to the process held, through its pidfd: never to
    /// another process that took its number. Without a pidfd (none could
    /// be opened: it had already gone) nothing is sent.
    pub(crate) fn kill(&self) {
        let Some(fd) = &self.pidfd else {
            return;
        };
        // SAFETY: sends SIGKILL through a pidfd we own; no memory is
        // passed (null siginfo).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            );
        }
    }

    /// Opens the process's memory for writing, bound to this process (see
    /// the module documentation).
    pub(crate) fn open_mem(&self) -> Result<File, WriteError> {
        if self.exited() {
            return Err(WriteError::Gone);
        }
        let path = format!("/proc/{}/mem", self.pid);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => WriteError::Gone,
                _ => WriteError::Refused(e),
            })?;
        // Alive now: it held the pid while the file was opened.
        if self.exited() {
            return Err(WriteError::Gone);
        }
        Ok(file)
    }
}

/// The pid a pidfd refers to (`Pid:` in its fdinfo).
fn pid_of(fd: &OwnedFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_through_the_handle_ends_the_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let h = ProcHandle::of_child(&child);
        h.kill();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_dead_process_is_never_written() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let h = ProcHandle::of_child(&child);
        assert!(!h.exited());
        let mem = h.open_mem().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // The process ended (and was reaped: its number is free for
        // anyone): no new file opens, and the one opened writes nothing.
        assert!(h.exited());
        assert!(matches!(h.open_mem(), Err(WriteError::Gone)));
        // A kill now reaches nobody (not a process that took the pid).
        h.kill();
        let page = [7u8; 4096];
        // SAFETY: writes from a live local buffer through our own file.
        let n =
            unsafe { libc::pwrite(mem.as_raw_fd(), page.as_ptr().cast(), page.len(), 0x10_0000) };
        assert!(n <= 0, "wrote {n} bytes into a dead process");
    }
}
