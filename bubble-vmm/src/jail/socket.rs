//! The VMM's control socket, bound before the jail and listened on after.
//!
//! The socket file lives in the broker's data directory, which a jailed
//! VMM can no longer reach, so it is bound first. `listen` comes last, in
//! the jailed VMM: the credentials a connecting broker reads with
//! `SO_PEERCRED` are those of the process that called `listen`, at that
//! time, so they name the VMM (its host pid, its own uid), not the waiter
//! or the identity it had before the jail.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::{check, JailError};

/// Binds a Unix stream socket at `path` (replacing a stale file) with
/// mode 0600, without listening yet.
pub fn bind(path: &Path) -> Result<OwnedFd, JailError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(JailError::BadArgs("socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let _ = std::fs::remove_file(path);
    // SAFETY: socket with integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check("socket", fd)?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: binds our socket to an address struct we own, of its size.
    check("bind", unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| JailError::Sys {
                what: "chmod of the socket",
                source,
            },
        )?;
    }
    Ok(sock)
}

/// Starts listening on a socket from [`bind`].
pub fn listen(sock: OwnedFd) -> Result<UnixListener, JailError> {
    // SAFETY: listen on a socket we own.
    check("listen", unsafe { libc::listen(sock.as_raw_fd(), 128) })?;
    Ok(UnixListener::from(sock))
}
