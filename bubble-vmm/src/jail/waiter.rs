//! The jail's waiter: the process the broker spawned, outside the VMM's
//! pid namespace, whose child is the VMM. It holds the VMM's `alive` pipe
//! (the VMM dies with it), dies with the broker while the VMM is a spare,
//! outlives it once the VMM has a bubble, and ends as the VMM did.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// The waiter's parent-death signal while the VMM is a spare: caught,
/// not fatal, so that the waiter can first look whether the VMM had
/// already asked to outlive the broker (a byte it may not have read yet:
/// at low priority on a loaded host, the broker can die between a create's
/// answer and the waiter's next turn).
fn parent_gone_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

static PARENT_GONE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_parent_gone(_: libc::c_int) {
    PARENT_GONE.store(true, Ordering::SeqCst);
}

/// Runs the waiter of VMM `vmm`: `alive` is the write end the VMM watches,
/// `from_vmm` where the VMM says `S` (outlive the broker); `die_parent`
/// the broker it dies with until then. Never returns.
pub(super) fn run(vmm: libc::pid_t, alive: i32, from_vmm: i32, die_parent: Option<u32>) -> ! {
    super::set_title("vmm:jail");
    // Nothing but the two pipes and the log: not the VMM's socket, the
    // shim image or /dev/kvm (never used here; the process ends without
    // dropping what owns them).
    for (from, to) in [
        (3, alive.min(from_vmm) - 1),
        (alive.min(from_vmm) + 1, alive.max(from_vmm) - 1),
    ] {
        if from <= to {
            // SAFETY: closes descriptors of this process only.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32) };
        }
    }
    // SAFETY: closes descriptors of this process only.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (alive.max(from_vmm) + 1) as u32,
            u32::MAX,
            0u32,
        )
    };
    let _ = super::harden(None);
    // A stopped waiter whose broker dies gets SIGHUP from the kernel (its
    // process group is orphaned): that must not end a bubble either.
    // SAFETY: sets a signal's disposition to ignore; no handler involved.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    // The signal mask `ppoll` waits with: the parent-death signal is
    // blocked everywhere else, so it is seen only there (as EINTR) and
    // never lost between a check and the wait.
    // SAFETY: sigset_t is plain data; zeroed is a valid value to fill.
    let mut waiting: libc::sigset_t = unsafe { std::mem::zeroed() };
    if let Some(parent) = die_parent {
        catch_parent_death(parent, &mut waiting);
    }
    let mut survive = false;
    let mut b = [0u8; 1];
    loop {
        if PARENT_GONE.load(Ordering::SeqCst) && !survive {
            // The broker is gone: the VMM lives on only if it asked
            // before (its byte may still be in the pipe), else this
            // process ends and the VMM with it.
            if readable_now(from_vmm) && read_byte(from_vmm, &mut b) == 1 && b[0] == b'S' {
                survive = true;
                let _ = super::survive_parent();
                continue;
            }
            // SAFETY: ends the process; the VMM gets its parent-death
            // signal (SIGKILL).
            unsafe { libc::_exit(0) }
        }
        let r = wait_readable(from_vmm, &waiting);
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        match read_byte(from_vmm, &mut b) {
            // Only `S` asks to outlive the broker; any other byte is
            // ignored.
            1 if b[0] == b'S' => {
                survive = true;
                let _ = super::survive_parent();
            }
            1 => {}
            n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            // The VMM closed its end (it exited, or a compromised VMM
            // closed it), or the pipe broke.
            _ => break,
        }
    }
    if die_parent.is_some() && !survive {
        // Still bound to the broker: a VMM that closed its pipe without
        // asking must not outlive it either.
        wait_exit_or_parent(vmm, &waiting);
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status to a local.
        let r = unsafe { libc::waitpid(vmm, &mut status, 0) };
        if r == vmm || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restores the default action of `sig`, unblocks it and
        // sends it to this process, which then ends as the VMM did.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        // SAFETY: ends the process without running destructors.
        unsafe { libc::_exit(128 + sig) }
    }
    // SAFETY: ends the process without running destructors.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// Replaces the waiter's parent-death SIGKILL with a caught signal,
/// blocked but in `waiting` (the mask its waits use); marks the broker
/// gone at once if it already is.
fn catch_parent_death(parent: u32, waiting: &mut libc::sigset_t) {
    let sig = parent_gone_signal();
    // SAFETY: installs an async-signal-safe handler (one atomic store),
    // without SA_RESTART so that the wait returns; sigset_t values are
    // plain data filled by the libc calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_parent_gone as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, sig);
        libc::sigprocmask(libc::SIG_BLOCK, &block, waiting);
        libc::sigdelset(waiting, sig);
        libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0);
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != parent {
        PARENT_GONE.store(true, Ordering::SeqCst);
    }
}

/// Waits until VMM `vmm` has exited (then returns, to reap it) or the
/// broker is gone (then ends this process, and the VMM with it).
fn wait_exit_or_parent(vmm: libc::pid_t, waiting: &libc::sigset_t) {
    // SAFETY: pidfd_open of our own child; the descriptor is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, vmm, 0) } as i32;
    loop {
        if PARENT_GONE.load(Ordering::SeqCst) {
            // SAFETY: ends the process; the VMM gets its parent-death
            // signal (SIGKILL).
            unsafe { libc::_exit(0) }
        }
        if pidfd < 0 {
            // No pidfd (the child is gone already, or an old kernel):
            // reap it at once.
            return;
        }
        let r = wait_readable(pidfd, waiting);
        if r > 0 || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            return;
        }
    }
}

/// Waits, with only the parent-death signal unblocked (`waiting`), until
/// `fd` is readable: `ppoll`'s result (-1 with EINTR on the signal).
fn wait_readable(fd: i32, waiting: &libc::sigset_t) -> libc::c_int {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, no timeout, a signal mask we built.
    unsafe { libc::ppoll(&mut p, 1, std::ptr::null(), waiting) }
}

/// Whether `fd` has a byte (or end of file) to read now.
fn readable_now(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one pollfd we own, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Reads one byte of `fd` into `b`: 1, 0 at end of file, or -1.
fn read_byte(fd: i32, b: &mut [u8; 1]) -> isize {
    // SAFETY: reads at most one byte into a buffer we own.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) }
}
