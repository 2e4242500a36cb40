//! Modes of the broker's files: nothing in the data directory is readable
//! by anyone but the broker (a jailed VMM runs as another uid), except
//! what parents need to reach the API socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::warn;

/// Mode of the data directory itself: others may pass through it to the
/// API socket (`DATA_DIR/bubbled.sock` by default) but not list it.
pub const DATA_DIR_MODE: u32 = 0o711;

/// Makes every file this process creates from now on private (umask
/// 077: directories 0700, files 0600, unless a mode is set on purpose,
/// as for the API socket), then brings what exists under `data_dir`
/// and `store_dir` to those modes (files left by an older broker).
/// Sockets are left as they are (each is given its mode when bound).
pub fn make_private(data_dir: &Path, store_dir: &Path) -> std::io::Result<()> {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))?;
    for root in [data_dir, store_dir] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            tighten(&e.path());
        }
    }
    Ok(())
}

/// Directories 0700 (recursively), regular files 0600; never follows a
/// symbolic link.
fn tighten(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let ft = meta.file_type();
    let want = if ft.is_dir() {
        0o700
    } else if ft.is_file() {
        0o600
    } else {
        return;
    };
    if meta.permissions().mode() & 0o7777 != want {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)) {
            warn!(path = %path.display(), error = %e, "cannot make a broker file private");
        }
    }
    if ft.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            tighten(&e.path());
        }
    }
}
