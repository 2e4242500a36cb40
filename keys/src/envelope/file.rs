//! Loading and creating a KEK file (host only).
//!
//! The file holds exactly the 32 raw key bytes, is a regular file, and must
//! not be readable or writable by group or others (mode 0600 or stricter);
//! a looser file is refused rather than used.

use super::Kek;
use std::format;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Why a KEK file could not be loaded or created. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekFileError {
    /// An I/O error on the file or its directory.
    #[error("KEK file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is readable or writable by group or others.
    #[error("KEK file {path}: mode {mode:o} is too open (must be 0600 or stricter)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a regular file.
    #[error("KEK file {path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file does not hold exactly 32 bytes.
    #[error("KEK file {path}: {len} bytes, expected 32")]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KekFileError + '_ {
    move |source| KekFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Kek {
    /// Loads a KEK from a file (32 raw bytes, mode 0600 or stricter).
    pub fn load(path: &Path) -> Result<Kek, KekFileError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let meta = f.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(KekFileError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KekFileError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() != 32 {
            return Err(KekFileError::Length {
                path: path.to_path_buf(),
                len: meta.len(),
            });
        }
        let mut buf = Zeroizing::new([0u8; 33]);
        let mut n = 0;
        // Read until EOF (at most 33 bytes) in case the file changed size.
        loop {
            if n == buf.len() {
                break;
            }
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(path)(e)),
            }
        }
        if n != 32 {
            return Err(KekFileError::Length {
                path: path.to_path_buf(),
                len: n as u64,
            });
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&buf[..32]);
        Ok(Kek(k))
    }

    /// Loads the KEK at `path`, or creates it (mode 0600, fresh random
    /// bytes from the OS) if it does not exist. Creation is atomic: the key
    /// is written and synced to a temporary file which is then linked into
    /// place without replacing a file another process created meanwhile.
    pub fn load_or_create(path: &Path) -> Result<Kek, KekFileError> {
        match Self::load(path) {
            Ok(k) => return Ok(k),
            Err(KekFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let kek = Kek::generate(&mut rand_core::OsRng);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or_else(|| KekFileError::NotAFile {
            path: path.to_path_buf(),
        })?;
        let mut suffix = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut suffix);
        let mut tmp_name = file_name.to_os_string();
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            crate::fmt_util::Hex(&suffix)
        ));
        let tmp = dir.join(tmp_name);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&kek.0[..]).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = File::open(&dir) {
                    let _ = d.sync_all();
                }
                Ok(kek)
            }
            // Someone else created it first: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(io_err(path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{unwrap_key, wrap_key, ChunkCipher, DataKey, TEST_SNAP as SNAP};
    use super::*;
    use alloc::format;
    use alloc::vec::Vec;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn load_or_create_makes_a_0600_file_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let a = Kek::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        assert_eq!(fs::read(&path).unwrap(), a.0.to_vec());
        let b = Kek::load_or_create(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // The sealed data survives a "restart" (reload from file).
        let k = DataKey::generate(&mut rand_core::OsRng);
        let w = wrap_key(&a, &k, &SNAP);
        let c = ChunkCipher::new(&k, &SNAP).encrypt(0, b"frozen");
        let k2 = unwrap_key(&Kek::load(&path).unwrap(), &w, &SNAP).unwrap();
        assert_eq!(
            ChunkCipher::new(&k2, &SNAP)
                .decrypt(0, &c)
                .unwrap()
                .expose(),
            b"frozen"
        );
    }

    #[test]
    fn loose_permissions_wrong_length_and_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        fs::write(&path, [1u8; 32]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::load_or_create(&path),
            Err(KekFileError::Permissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::load(&path).is_ok());
        assert_eq!(Kek::load(&path).unwrap().0[..], [1u8; 32]);

        fs::write(&path, [1u8; 31]).unwrap();
        assert!(matches!(
            Kek::load_or_create(&path),
            Err(KekFileError::Length { len: 31, .. })
        ));
        fs::write(&path, [1u8; 33]).unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(KekFileError::Length { len: 33, .. })
        ));

        let sub = dir.path().join("subdir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            Kek::load_or_create(&sub),
            Err(KekFileError::NotAFile { .. })
        ));

        let missing_dir = dir.path().join("nope").join("kek");
        let err = Kek::load_or_create(&missing_dir).unwrap_err();
        assert!(matches!(err, KekFileError::Io { .. }));
        // Errors name the file but never contain key bytes.
        let msg = format!("{err}");
        assert!(msg.contains("nope"), "{msg}");
    }
}
