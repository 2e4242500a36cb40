//! Namespaces, root directory and identity of a jailed VMM.
//!
//! [`enter`] runs in the process the broker spawned, single-threaded,
//! right after `execve`: it opens `/dev/kvm` (the one file a VMM needs;
//! the shim image and its socket are descriptors already), unshares the
//! mount, pid, net, ipc and uts namespaces (and the user namespace on the
//! unprivileged path), and forks. A new pid namespace holds only the
//! children of the process that made it, so the fork is what puts the VMM
//! in it: the child is the VMM (pid 1 in its namespace); the parent stays
//! behind as a small waiter ([`wait_for_vmm`]) that ends as the VMM ended
//! (same exit code or signal), so the broker, whose child the waiter is,
//! still learns how its VMM died (a seccomp kill above all) and reaps it.
//! The broker addresses the VMM itself by the pid the kernel gives for
//! its socket peer (`SO_PEERCRED`, the host pid); killing that pid ends
//! the waiter too.
//!
//! The VMM then pivots into a private, empty, read-only tmpfs (nothing of
//! the host's file system stays reachable; `/proc` is not mounted) and,
//! when the broker is root, takes the uid/gid the broker allocated it.

use std::ffi::CString;
use std::io;
use std::sync::OnceLock;

use super::{check, JailError};

/// What the broker asked of the jail on the command line
/// (`--jail-ns 1 [--jail-uid U --jail-gid G] [--jail-userns 1]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailArgs {
    /// The uid and gid to run as (allocated by the broker), if any.
    pub id: Option<(u32, u32)>,
    /// Make an unprivileged user namespace mapping a single id (the path
    /// of a broker that is not root; forced by `[jail] userns = true`).
    pub userns: bool,
    /// A descriptor the VMM keeps open for its whole life and never uses:
    /// the broker's host-wide claim on the VMM's uid (a lock held while
    /// any process holds the open file), so that the claim outlives a
    /// broker that dies before its VMM.
    pub hold_fd: Option<i32>,
}

impl JailArgs {
    /// Removes the `--jail-*` options from `args`; `Some` if `--jail-ns 1`
    /// was among them.
    pub fn extract(args: &mut Vec<String>) -> Result<Option<Self>, JailError> {
        let mut on = false;
        let (mut uid, mut gid) = (None, None);
        let mut j = JailArgs::default();
        let mut rest = Vec::with_capacity(args.len());
        let mut it = std::mem::take(args).into_iter();
        while let Some(k) = it.next() {
            if !k.starts_with("--jail-") {
                rest.push(k);
                continue;
            }
            let v = it
                .next()
                .ok_or(JailError::BadArgs("--jail-* needs a value"))?;
            let num = |v: &str| v.parse::<u32>().map_err(|_| JailError::BadArgs("bad id"));
            match k.as_str() {
                "--jail-ns" => on = v == "1",
                "--jail-userns" => j.userns = v == "1",
                "--jail-uid" => uid = Some(num(&v)?),
                "--jail-gid" => gid = Some(num(&v)?),
                "--jail-hold-fd" => {
                    let fd = v
                        .parse::<i32>()
                        .ok()
                        .filter(|&fd| fd > 2)
                        .ok_or(JailError::BadArgs("bad --jail-hold-fd"))?;
                    j.hold_fd = Some(fd);
                }
                _ => return Err(JailError::BadArgs("unknown --jail-* option")),
            }
        }
        *args = rest;
        j.id = match (uid, gid) {
            (Some(u), Some(g)) => Some((u, g)),
            (None, None) => None,
            _ => return Err(JailError::BadArgs("--jail-uid and --jail-gid go together")),
        };
        Ok(on.then_some(j))
    }

    /// The options [`JailArgs::extract`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--jail-ns".to_string(), "1".into()];
        if let Some((u, g)) = self.id {
            v.extend(["--jail-uid".into(), u.to_string()]);
            v.extend(["--jail-gid".into(), g.to_string()]);
        }
        if self.userns {
            v.extend(["--jail-userns".into(), "1".into()]);
        }
        if let Some(fd) = self.hold_fd {
            v.extend(["--jail-hold-fd".into(), fd.to_string()]);
        }
        v
    }
}

const NS_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// The VMM's end of the pipe to its waiter: a byte asks the waiter to
/// stop dying with the broker (see [`super::survive_parent`]).
static TO_WAITER: OnceLock<i32> = OnceLock::new();

/// Whether this process is a VMM inside its own namespaces.
pub fn in_jail() -> bool {
    TO_WAITER.get().is_some()
}

/// Asks the waiter to stop dying with the broker.
pub(super) fn tell_waiter_to_survive() -> Result<(), JailError> {
    if let Some(&fd) = TO_WAITER.get() {
        // SAFETY: writes one byte from a local to our end of the pipe.
        let n = unsafe { libc::write(fd, b"S".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(sys("telling the waiter to outlive the broker"));
        }
    }
    Ok(())
}

fn sys(what: &'static str) -> JailError {
    JailError::Sys {
        what,
        source: io::Error::last_os_error(),
    }
}

fn pipe() -> Result<(i32, i32), JailError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    check("pipe2", unsafe {
        libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    Ok((fds[0], fds[1]))
}

fn close(fd: i32) {
    // SAFETY: closes a pipe end this module created and no one else owns.
    unsafe {
        libc::close(fd);
    }
}

/// Puts this process in its jail (see the module documentation); returns
/// in the VMM, never in the waiter. `die_parent`: the waiter (and with it
/// the VMM) dies with that broker. Call it single-threaded, after
/// unwanted descriptors are closed.
pub fn enter(j: &JailArgs, die_parent: Option<u32>) -> Result<(), JailError> {
    crate::vm::prepare_kvm().map_err(JailError::Kvm)?;
    if j.userns {
        // As root with an allocated id (the forced path): become that id
        // first, so what follows is exactly an unprivileged broker's.
        // SAFETY: geteuid has no preconditions.
        if let (Some((u, g)), 0) = (j.id, unsafe { libc::geteuid() }) {
            become_id(u, g)?;
            // Changing uid made the process non-dumpable, which gives its
            // /proc files to root: it could not write its own id maps. An
            // unprivileged broker's VMM is dumpable; so is this one.
            // SAFETY: prctl with integer arguments only.
            check("PR_SET_DUMPABLE", unsafe {
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0)
            })?;
        }
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // SAFETY: unshare with flags only; this process is single-threaded.
        check("unshare", unsafe {
            libc::unshare(libc::CLONE_NEWUSER | NS_FLAGS)
        })?;
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/uid_map", &format!("0 {uid} 1"))?;
        write_file("/proc/self/gid_map", &format!("0 {gid} 1"))?;
    } else {
        // SAFETY: unshare with flags only; this process is single-threaded.
        check("unshare", unsafe { libc::unshare(NS_FLAGS) })?;
    }
    // Changing credentials (above) clears the parent-death signal: set it
    // after.
    if let Some(p) = die_parent {
        super::die_with_parent(p)?;
    }
    let (alive_r, alive_w) = pipe()?;
    let (to_waiter_r, to_waiter_w) = pipe()?;
    // SAFETY: this process is single-threaded (no lock can be held by a
    // thread that does not exist in the child).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork"));
    }
    if pid > 0 {
        close(alive_r);
        close(to_waiter_w);
        // The VMM's parent-death signal is sent with the waiter's
        // credentials, which must allow it to signal the VMM: the same
        // uid. Changing it clears the waiter's own: set again.
        if !j.userns {
            if let Some((u, g)) = j.id {
                let again = become_id(u, g).and_then(|()| match die_parent {
                    Some(p) => super::die_with_parent(p),
                    None => Ok(()),
                });
                if let Err(e) = again {
                    eprintln!("bubble-vmm: jail waiter: {e}");
                    // SAFETY: ends the process; the VMM dies with it.
                    unsafe { libc::_exit(2) }
                }
            }
        }
        super::waiter::run(pid, alive_w, to_waiter_r, die_parent);
    }
    close(alive_w);
    close(to_waiter_r);
    let _ = TO_WAITER.set(to_waiter_w);
    // Its own session and process group inside the namespace.
    // SAFETY: setsid has no memory effects.
    unsafe {
        libc::setsid();
    }
    pivot_into_empty_root()?;
    if !j.userns {
        if let Some((u, g)) = j.id {
            super::drop_bounding_set();
            become_id(u, g)?;
        }
    }
    // Die with the waiter, whose pid this namespace cannot name: the
    // waiter holds the write end of `alive`; if it is already gone, the
    // read end reports a hang-up.
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    let mut p = libc::pollfd {
        fd: alive_r,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    close(alive_r);
    if n != 0 {
        return Err(JailError::ParentGone(0));
    }
    Ok(())
}

fn write_file(path: &'static str, text: &str) -> Result<(), JailError> {
    std::fs::write(path, text).map_err(|source| JailError::Sys { what: path, source })
}

/// Sets the real, effective and saved uid and gid; no supplementary
/// groups.
fn become_id(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: setgroups with an empty list reads nothing.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })
}

/// Makes a private, empty tmpfs the root of this mount namespace, drops
/// the old root, and makes the new one read-only.
fn pivot_into_empty_root() -> Result<(), JailError> {
    let c = |s: &str| CString::new(s).map_err(|_| JailError::BadArgs("path"));
    let (root, tmp, tmpfs, dot) = (c("/")?, c("/tmp")?, c("tmpfs")?, c(".")?);
    let opts = c("size=4k,nr_inodes=2,mode=0555")?;
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: every pointer is a NUL-terminated string owned here or
    // null where the kernel allows it; these calls change only this
    // process's (new, private) mount namespace.
    unsafe {
        check(
            "making / private",
            libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            ),
        )?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(
            "mounting the jail's tmpfs",
            libc::mount(
                tmpfs.as_ptr(),
                tmp.as_ptr(),
                tmpfs.as_ptr(),
                flags,
                opts.as_ptr().cast(),
            ),
        )?;
        check("chdir", libc::chdir(tmp.as_ptr()))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
        )?;
        check(
            "detaching the old root",
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir /", libc::chdir(root.as_ptr()))?;
        check(
            "remounting the root read-only",
            libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                null.cast(),
            ),
        )?;
    }
    Ok(())
}
