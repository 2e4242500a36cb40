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

/// The name of this data directory's bubble cgroup hierarchy,
/// `bubbled-<id>`: the id is random, made on the first start and kept in
/// `DATA_DIR/cgroup-id` (0600), so that two brokers whose data
/// directories have the same path (in two containers sharing the host's
/// cgroups) never share a hierarchy, whose stray VMMs each would kill.
/// A data directory made before this file existed (it has a registry)
/// keeps the name it had: a hash of its path.
pub fn cgroup_hierarchy(data_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = data_dir.join("cgroup-id");
    let valid = |id: &str| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    match std::fs::read_to_string(&file) {
        Ok(id) if valid(id.trim()) => return Ok(format!("bubbled-{}", id.trim())),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a 16-digit hex id", file.display()),
            ))
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let id = if data_dir.join("registry.redb").exists() {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data_dir.hash(&mut h);
        format!("{:016x}", h.finish())
    } else {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        hex::encode(b)
    };
    // Two brokers starting at once on one directory: the first file wins.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
    {
        Ok(mut f) => {
            f.write_all(id.as_bytes())?;
            f.sync_all()?;
            Ok(format!("bubbled-{id}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => cgroup_hierarchy(data_dir),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::cgroup_hierarchy;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hierarchy_ids_are_random_per_directory_and_kept() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = cgroup_hierarchy(a.path()).unwrap();
        assert!(
            first.starts_with("bubbled-") && first.len() == 24,
            "{first}"
        );
        // Kept across starts, private.
        assert_eq!(cgroup_hierarchy(a.path()).unwrap(), first);
        let mode = std::fs::metadata(a.path().join("cgroup-id"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another directory: another hierarchy, even at the same path
        // later (a fresh directory gets a fresh id).
        assert_ne!(cgroup_hierarchy(b.path()).unwrap(), first);
        std::fs::remove_file(a.path().join("cgroup-id")).unwrap();
        assert_ne!(cgroup_hierarchy(a.path()).unwrap(), first);
    }

    #[test]
    fn an_old_directory_keeps_its_name_and_a_bad_id_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("registry.redb"), b"").unwrap();
        let legacy = cgroup_hierarchy(d.path()).unwrap();
        // The hash of its path, as before the id file existed.
        let want = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.path().hash(&mut h);
            format!("bubbled-{:016x}", h.finish())
        };
        assert_eq!(legacy, want);
        assert_eq!(cgroup_hierarchy(d.path()).unwrap(), legacy);
        std::fs::write(d.path().join("cgroup-id"), b"../../etc").unwrap();
        assert!(cgroup_hierarchy(d.path()).is_err());
    }
}
