//! Compare-and-swap of one small object (a claim): create it only if it
//! does not exist, or replace it only if it is still the version read.
//!
//! On S3 this is a conditional PUT (`If-None-Match: *` for a create,
//! `If-Match: <e-tag>` for a replace; object_store's `PutMode::Create` and
//! `PutMode::Update`). object_store's local file system implements only
//! the create, so a local store does both itself: under an exclusive lock
//! on `STORE/.claims.lock` (held by every broker sharing the directory) it
//! compares the object's bytes with the version read and replaces it by a
//! rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{store_err, FrozenStore};
use crate::error::BrokerError;

/// The version of an object as it was read, for a conditional replace.
#[derive(Clone, Debug)]
pub(super) enum Version {
    /// S3: the object's e-tag (and version id, if the bucket has them).
    Tag(UpdateVersion),
    /// Local store: the object's whole content.
    Bytes(Vec<u8>),
}

/// Why a conditional write did not happen.
#[derive(Debug, thiserror::Error)]
pub(super) enum CasError {
    /// The object is not (any more) the version expected.
    #[error("the object changed")]
    Conflict,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] BrokerError),
}

impl FrozenStore {
    /// Reads an object and its version; `None` if it does not exist.
    pub(super) async fn cas_read(
        &self,
        path: &ObjPath,
    ) -> Result<Option<(Vec<u8>, Version)>, BrokerError> {
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            return match std::fs::read(&file) {
                Ok(b) => Ok(Some((b.clone(), Version::Bytes(b)))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(BrokerError::Store(format!("{}: {e}", file.display()))),
            };
        }
        match self.store.get(path).await {
            Ok(r) => {
                let v = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let b = r.bytes().await.map_err(store_err)?;
                Ok(Some((b.to_vec(), Version::Tag(v))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Writes `body` at `path` only if the object is still `expect` (or,
    /// with `None`, does not exist yet). Returns the new version.
    pub(super) async fn cas_write(
        &self,
        path: &ObjPath,
        expect: Option<&Version>,
        body: Vec<u8>,
    ) -> Result<Version, CasError> {
        if let Some(root) = self.local_root.clone() {
            let rel = path.as_ref().to_string();
            let expect = match expect {
                None => None,
                Some(Version::Bytes(b)) => Some(b.clone()),
                // A tag comes only from an S3 store.
                Some(Version::Tag(_)) => return Err(CasError::Conflict),
            };
            return tokio::task::spawn_blocking(move || local_cas(&root, &rel, expect, body))
                .await
                .map_err(|e| BrokerError::Store(e.to_string()))?;
        }
        let mode = match expect {
            None => PutMode::Create,
            Some(Version::Tag(v)) => PutMode::Update(v.clone()),
            Some(Version::Bytes(_)) => return Err(CasError::Conflict),
        };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(body), opts)
            .await
        {
            Ok(r) => Ok(Version::Tag(UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. },
            ) => Err(CasError::Conflict),
            Err(e) => Err(CasError::Store(store_err(e))),
        }
    }
}

impl FrozenStore {
    /// Deletes the object at `path` only if it is still `expect`; true if
    /// it was deleted. A local store compares and removes under the claim
    /// lock (atomic among brokers sharing the directory). S3 has no
    /// conditional DELETE: the object is read again right before the
    /// DELETE and removed only if its e-tag is still `expect`'s, which
    /// narrows the window to one round trip but does not close it.
    pub(super) async fn cas_delete(
        &self,
        path: &ObjPath,
        expect: &Version,
    ) -> Result<bool, BrokerError> {
        if let Some(root) = self.local_root.clone() {
            let Version::Bytes(expect) = expect.clone() else {
                return Ok(false);
            };
            let rel = path.as_ref().to_string();
            return tokio::task::spawn_blocking(move || local_cas_delete(&root, &rel, &expect))
                .await
                .map_err(|e| BrokerError::Store(e.to_string()))?;
        }
        let Version::Tag(want) = expect else {
            return Ok(false);
        };
        match self.store.head(path).await {
            Ok(m) if m.e_tag.is_some() && m.e_tag == want.e_tag => {}
            Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(store_err(e)),
        }
        match self.store.delete(path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(e)),
        }
    }
}

/// The local store's compare-and-delete, under the store-wide claim lock.
fn local_cas_delete(root: &Path, rel: &str, expect: &[u8]) -> Result<bool, BrokerError> {
    let io = |p: &Path, e: std::io::Error| BrokerError::Store(format!("{}: {e}", p.display()));
    let lock = lock_local(root).map_err(|e| io(&root.join(".claims.lock"), e))?;
    let file = root.join(rel);
    let same = match std::fs::read(&file) {
        Ok(b) => b == expect,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(&file, e)),
    };
    if same {
        std::fs::remove_file(&file).map_err(|e| io(&file, e))?;
    }
    drop(lock);
    Ok(same)
}

/// Opens and locks the store-wide claim lock of a local store.
fn lock_local(root: &Path) -> std::io::Result<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".claims.lock"))?;
    lock.lock()?;
    Ok(lock)
}

/// Removes a local copy's directory `root/base` and its bubble's directory
/// if they are empty, under the claim lock. Directories are created under
/// the same lock (a claim is the first object written into a generation),
/// so a removal never races the creation of the next generation's
/// directory: either it runs first and the claim write creates the
/// directories again, or it finds the bubble's directory not empty.
pub(super) fn remove_empty_local_dirs(root: &Path, base: &str) {
    let Ok(lock) = lock_local(root) else {
        // Without the lock, leaving an empty directory is the safe side.
        return;
    };
    let d = root.join(base);
    let _ = std::fs::remove_dir(&d);
    if let Some(parent) = d.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    drop(lock);
}

/// The local store's compare-and-swap, under the store-wide claim lock.
fn local_cas(
    root: &Path,
    rel: &str,
    expect: Option<Vec<u8>>,
    body: Vec<u8>,
) -> Result<Version, CasError> {
    let io = |p: &Path, e: std::io::Error| {
        CasError::Store(BrokerError::Store(format!("{}: {e}", p.display())))
    };
    let lock = lock_local(root).map_err(|e| io(&root.join(".claims.lock"), e))?;
    let file = root.join(rel);
    let now = match std::fs::read(&file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&file, e)),
    };
    if now != expect {
        return Err(CasError::Conflict);
    }
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    // The temporary file lives beside the lock, not in the copy's
    // directory, where an unexpected object makes the copy refused.
    let tmp: PathBuf = root.join(format!(".claim-{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&body).map_err(|e| io(&tmp, e))?;
    // Not fsynced: every broker that can read a local store runs on this
    // host, so a power loss ends every claimant with its claim, and the
    // registry (which is fsynced) decides what a restarted broker runs.
    std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))?;
    drop(lock);
    Ok(Version::Bytes(body))
}
