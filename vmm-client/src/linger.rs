//! A VMM that acknowledged SHUTDOWN must then exit: one that keeps
//! running (hostile or stuck) is killed after a grace period.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A handle on process `pid` that stays valid whatever happens to the
/// number (`pidfd`); `None` if it is gone already.
pub(crate) fn open(pid: u32) -> Option<OwnedFd> {
    if pid == 0 {
        return None;
    }
    // SAFETY: pidfd_open with integer arguments only.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// In the background: unless the process behind `pidfd` exits within
/// `grace`, SIGKILL it (through the pidfd: never another process that
/// took its number).
pub(crate) fn kill_unless_gone(pidfd: OwnedFd, pid: u32, grace: Duration) {
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns `pidfd` and deregisters it before
        // dropping (closing) it; nothing else holds that descriptor.
        let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
        let Ok(fd) = registered else {
            return;
        };
        // A pidfd is readable once its process has exited.
        if tokio::time::timeout(grace, fd.readable()).await.is_ok() {
            return;
        }
        tracing::warn!(
            pid,
            grace_ms = grace.as_millis() as u64,
            "VMM acknowledged SHUTDOWN but still runs: killed"
        );
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
    });
}
