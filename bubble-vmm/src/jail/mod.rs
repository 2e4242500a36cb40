//! The VMM process's jail, applied by the VMM to itself before it reads a
//! single request or creates any thread: no inherited descriptors but
//! those handed over on purpose, small resource limits, `no_new_privs`, no
//! capabilities, death with the broker where asked, and (see [`seccomp`])
//! a system-call allowlist per thread before the guest first runs.
//!
//! The broker clears the environment when it spawns a VMM (see
//! `spawn.rs`); everything here runs in the VMM itself, after `execve`,
//! which keeps the broker's fast `posix_spawn` path (a `pre_exec` hook
//! would force a full `fork` of the broker). Nothing untrusted has run in
//! the process at that point: the guest has not been created yet and no
//! request has been read. What this does and does not protect is in
//! `docs/jail.md`.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

mod ns;
pub mod seccomp;
pub mod socket;
mod waiter;

pub use ns::{in_jail, JailArgs};
/// Largest number of descriptors a VMM may hold. A VMM holds about a
/// dozen: `/dev/kvm`, the VM, the vCPU, guest memory, the shared shim
/// image, the listening socket, the broker connection (two handles), its
/// log, stdio.
pub const MAX_FDS: u64 = 64;
/// Largest file a VMM may write (its log), bytes.
pub const MAX_FILE_SIZE: u64 = 64 << 20;
/// Most processes (threads count) a VMM's own uid may have: a VMM runs
/// five threads at most, its waiter one.
pub const MAX_PROCS: u64 = 16;

/// Why the jail could not be set up (the VMM then refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call the jail needs failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The broker that started this VMM was already gone when the VMM
    /// asked to die with it.
    #[error("the broker (pid {0}) is gone")]
    ParentGone(u32),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A `--jail-*` option or a path is malformed.
    #[error("jail: {0}")]
    BadArgs(&'static str),
    /// `/dev/kvm` could not be opened before the jail closed it off.
    #[error("jail: {0}")]
    Kvm(#[source] crate::vm_error::VmError),
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Sys {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// The whole jail of a VMM process, in order: closes every inherited
/// descriptor but `keep`, binds the control socket at `socket`, enters
/// the namespaces, root and identity of `jail` (if given; see [`ns`]),
/// applies [`harden`], makes the process die with broker `die_parent`
/// (if given), and only then listens on the socket. Call it first thing,
/// before any other thread exists.
pub fn enter(
    keep: &[i32],
    socket: &Path,
    jail: Option<&JailArgs>,
    die_parent: Option<u32>,
) -> Result<UnixListener, JailError> {
    close_inherited(keep)?;
    let sock = socket::bind(socket)?;
    match jail {
        Some(j) => {
            ns::enter(j, die_parent)?;
            // A uid of its own: then a process count limit means something.
            harden(j.id.map(|_| MAX_PROCS))?;
        }
        None => {
            harden(None)?;
            if let Some(p) = die_parent {
                die_with_parent(p)?;
            }
        }
    }
    socket::listen(sock)
}

/// Process hygiene: lowers resource limits (`RLIMIT_NPROC` to `nproc`
/// when given), sets `no_new_privs` and drops every capability.
pub fn harden(nproc: Option<u64>) -> Result<(), JailError> {
    if let Some(n) = nproc {
        limit(libc::RLIMIT_NPROC, n, "RLIMIT_NPROC")?;
    }
    limit(libc::RLIMIT_NOFILE, MAX_FDS, "RLIMIT_NOFILE")?;
    limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    limit(libc::RLIMIT_FSIZE, MAX_FILE_SIZE, "RLIMIT_FSIZE")?;
    // Writing past RLIMIT_FSIZE then fails with EFBIG instead of killing
    // the process with SIGXFSZ.
    // SAFETY: installs the SIG_IGN disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    drop_capabilities()
}

/// Closes every descriptor from 3 up except those in `keep`.
pub fn close_inherited(keep: &[i32]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > from {
            let last = if fd == u32::MAX { u32::MAX } else { fd - 1 };
            // SAFETY: close_range only closes descriptors of this process;
            // none of those in the range is owned by a Rust object yet
            // (this runs before anything opens a file).
            let rc = unsafe { libc::syscall(libc::SYS_close_range, from, last, 0u32) };
            check("close_range", rc as libc::c_int)?;
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

fn limit(res: libc::__rlimit_resource_t, max: u64, what: &'static str) -> Result<(), JailError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    check(what, unsafe { libc::getrlimit(res, &mut cur) })?;
    // Never raise a limit the broker was given lower.
    let v = max.min(cur.rlim_max);
    let new = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: setrlimit reads the struct we own.
    check(what, unsafe { libc::setrlimit(res, &new) })
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability: ambient, bounding set (when we may), then the
/// effective, permitted and inheritable sets.
fn drop_capabilities() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("PR_CAP_AMBIENT_CLEAR_ALL", rc)?;
    drop_bounding_set();
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, both
    // owned here and laid out as the kernel defines them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check("capset", rc as libc::c_int)
}

/// Empties the capability bounding set, when this process may (it has
/// `CAP_SETPCAP`).
fn drop_bounding_set() {
    if has_effective_setpcap() {
        for cap in 0..64 {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
                // EINVAL: past the last capability this kernel knows.
                break;
            }
        }
    }
}

fn has_effective_setpcap() -> bool {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two data structs into the array we own.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    rc == 0 && data[0].effective & (1 << 8) != 0
}

/// Makes the kernel kill this process (SIGKILL) when the thread that
/// spawned it exits, and closes the race with that happening before the
/// request: if the parent is no longer `parent`, it is already gone.
/// Call it on the main thread (threads created later share its fate: the
/// signal goes to the whole process).
pub fn die_with_parent(parent: u32) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != parent {
        return Err(JailError::ParentGone(parent));
    }
    Ok(())
}

/// Undoes [`die_with_parent`] (a spare given a bubble that must survive
/// a broker restart). Call it on the thread that called that. In a jail
/// the waiter is what dies with the broker: it is told to stop.
pub fn survive_parent() -> Result<(), JailError> {
    if in_jail() {
        return ns::tell_waiter_to_survive();
    }
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0)
    })
}

/// Names the calling thread (the main thread names the process in `ps`
/// and `/proc/PID/comm`); the kernel keeps 15 bytes.
pub fn set_title(title: &str) {
    let mut name = [0u8; 16];
    for (d, s) in name.iter_mut().zip(title.bytes().take(15)) {
        *d = s;
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes; `name` is 16 bytes with a NUL at the end at least.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
    }
}

/// The title of a configured VMM: `vmm:` and as much of the bubble id as
/// fits (without its `b-` prefix).
pub fn bubble_title(bubble_id: &str) -> String {
    format!("vmm:{}", bubble_id.strip_prefix("b-").unwrap_or(bubble_id))
}
