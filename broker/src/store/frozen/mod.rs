//! Frozen bubbles: encrypted snapshots in an object store.
//!
//! Layout in the store, per bubble and generation (`frozen/<id>/g<gen>/`):
//! - `chunk-<i>`: the VMM snapshot (vCPU state and non-zero pages) cut
//!   into 1 MiB pieces, each AES-256-GCM under a fresh per-snapshot data
//!   key with the snapshot id and chunk index as AAD (`bubble-keys`
//!   envelope);
//! - `manifest`: JSON with the format version, snapshot id, the data key
//!   wrapped by the key-encryption key (the broker's, `DATA_DIR/kek` 0600,
//!   or the parent's), and a header sealed under the data key as chunk
//!   `u64::MAX` (so it is authenticated): bubble id, owner, generation,
//!   memory, image, snapshot length and chunk count.
//!
//! Chunks are written first and the manifest last; every object write is
//! atomic, and a local store is fsynced (files and directories) before
//! `put` returns, so a crash leaves either no manifest (the bubble is still
//! running, the chunks are garbage) or a complete frozen bubble.
//! See `docs/frozen-format.md`.

pub(crate) mod await_results;
pub(crate) mod awaits;
mod cas;
mod claim;
mod keeper;
mod write;
pub use awaits::IndexError;
pub use claim::{Claim, ClaimError};
pub use keeper::ClaimKeeper;
pub use write::FrozenWriter;

use std::sync::Arc;

use bubble_keys::envelope::ChunkCipher;
use bubble_keys::{Kek, SecretBytes};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::BrokerError;

pub use bubble_frozen::{Header, CHUNK};
use bubble_frozen::{Manifest, ManifestError, FORMAT, HEADER_INDEX};

/// The decoy manifest's object (outside `frozen/`).
const DECOY: &str = "frozen-decoy";

/// Chunks fetched and decrypted concurrently during a restore.
const FETCH_AHEAD: usize = 4;

/// The store of frozen bubbles.
#[derive(Clone)]
pub struct FrozenStore {
    store: Arc<dyn ObjectStore>,
    buffers: BufPool,
    /// The directory of a local store (its empty directories are removed
    /// with the copies they held).
    local_root: Option<std::path::PathBuf>,
    /// How long a claim lasts without renewal.
    lease: std::time::Duration,
    /// The key authenticating the await index (see `awaits`), derived
    /// from the broker key-encryption key every broker sharing the store
    /// holds; without it the index is neither written nor believed.
    index_key: std::sync::OnceLock<zeroize::Zeroizing<[u8; 32]>>,
}

/// Default claim lease.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Chunk buffers kept for reuse: their pages stay mapped, so reading a
/// chunk into one costs no page faults (a fresh megabyte costs about
/// 0.4 ms of them on hosts like these). Buffers come back zeroized.
#[derive(Clone, Default)]
struct BufPool(Arc<parking_lot::Mutex<Vec<Vec<u8>>>>);

/// Buffers the pool keeps at most (about 1 MiB each).
const POOL_MAX: usize = 8;

impl BufPool {
    /// A buffer of `len` zero bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.0.lock().pop().unwrap_or_default();
        v.clear();
        v.resize(len, 0);
        v
    }

    /// Keeps an empty (zeroized) buffer for reuse.
    fn put(&self, v: Vec<u8>) {
        let mut p = self.0.lock();
        if p.len() < POOL_MAX && v.capacity() >= CHUNK {
            p.push(v);
        }
    }
}

/// One decrypted chunk of a snapshot (guest memory: a secret). Zeroized
/// when dropped; its buffer goes back to the store's pool.
pub struct PlainChunk {
    bytes: Option<SecretBytes>,
    pool: BufPool,
}

impl PlainChunk {
    /// The plaintext. Do not log it.
    pub fn expose(&self) -> &[u8] {
        self.bytes.as_ref().map(|b| b.expose()).unwrap_or_default()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PlainChunk {
    fn drop(&mut self) {
        if let Some(b) = self.bytes.take() {
            self.pool.put(b.into_zeroized_buffer());
        }
    }
}

fn prefix(id: &str, generation: u64) -> String {
    format!("frozen/{id}/g{generation}")
}

fn store_err(e: object_store::Error) -> BrokerError {
    BrokerError::Store(e.to_string())
}

impl FrozenStore {
    /// A store in a local directory.
    /// The directory is made private (0700): what is under it is readable
    /// by the broker's uid only, whatever mode the files get.
    pub fn local(dir: &std::path::Path) -> Result<Self, BrokerError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |e: std::io::Error| BrokerError::Store(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?;
        Ok(Self {
            store: Arc::new(fs),
            buffers: BufPool::default(),
            local_root: Some(dir.to_path_buf()),
            lease: DEFAULT_LEASE,
            index_key: std::sync::OnceLock::new(),
        })
    }

    /// A store at an S3-compatible URL: `s3://BUCKET[/PREFIX][?endpoint=URL&region=R]`.
    /// Credentials come from the usual environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, ...). A plain-http endpoint is allowed only
    /// for loopback addresses.
    pub fn s3(url: &str) -> Result<Self, BrokerError> {
        use object_store::aws::AmazonS3Builder;
        let bad = |m: &str| BrokerError::Store(format!("store URL {url:?}: {m}"));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("must start with s3://"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad("malformed query"))?;
            match k {
                "endpoint" => {
                    let loopback = v.starts_with("http://127.")
                        || v.starts_with("http://localhost")
                        || v.starts_with("http://[::1]");
                    if v.starts_with("http://") && !loopback {
                        return Err(bad("plain http is allowed only to loopback endpoints"));
                    }
                    b = b.with_endpoint(v).with_allow_http(loopback);
                }
                "region" => b = b.with_region(v),
                other => return Err(bad(&format!("unknown parameter {other}"))),
            }
        }
        let s3 = b.build().map_err(store_err)?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        Ok(Self {
            store,
            buffers: BufPool::default(),
            local_root: None,
            lease: DEFAULT_LEASE,
            index_key: std::sync::OnceLock::new(),
        })
    }

    /// Whether the store answers: a read of an object that need not exist
    /// (not found is an answer).
    pub async fn probe(&self) -> Result<(), String> {
        match self.store.head(&ObjPath::from("health-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Makes a local copy durable before the registry points at it: the
    /// object store writes files without fsync, so every chunk, the
    /// manifest and the directories holding them are synced here. (An S3
    /// store acknowledges a PUT once it is durable.)
    async fn sync_local(&self, base: &str, chunks: u64) -> Result<(), BrokerError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let dir = root.join(base);
        tokio::task::spawn_blocking(move || {
            let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
            for i in 0..chunks {
                sync(&dir.join(format!("chunk-{i}")))?;
            }
            sync(&dir.join("manifest"))?;
            // The directory entries: the generation's, the bubble's, and
            // `frozen/` itself (created with the first copy).
            let mut d = Some(dir.as_path());
            while let Some(p) = d.filter(|p| p.starts_with(&root)) {
                sync(p)?;
                d = p.parent();
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| BrokerError::Store(format!("sync: {e}")))?
        .map_err(|e| BrokerError::Store(format!("sync {base}: {e}")))
    }

    /// Reads and authenticates a frozen copy's manifest: its header and the
    /// cipher for its chunks. Nothing else is read.
    pub async fn open(
        &self,
        id: &str,
        generation: u64,
        kek: &Kek,
    ) -> Result<(Header, ChunkCipher), BrokerError> {
        let base = prefix(id, generation);
        let raw = match self
            .store
            .get(&ObjPath::from(format!("{base}/manifest")))
            .await
        {
            Ok(r) => r.bytes().await.map_err(store_err)?,
            Err(object_store::Error::NotFound { .. }) => {
                // As much work as refusing a copy that exists (no oracle).
                self.decoy_open(id, generation, kek).await;
                return Err(BrokerError::FrozenMissing);
            }
            Err(e) => return Err(store_err(e)),
        };
        let (header, cipher) =
            bubble_frozen::decode_manifest(&raw, id, generation, kek).map_err(|e| match e {
                ManifestError::WrongKey => BrokerError::WrongKey,
                ManifestError::Damaged(m) => BrokerError::DataLoss(m),
            })?;
        self.refuse_unexpected(&base, header.chunks).await?;
        Ok((header, cipher))
    }

    /// Stores the decoy manifest [`FrozenStore::decoy_open`] reads, if it
    /// is not there yet (a broker that cannot write it still starts; its
    /// refusals of missing copies then decode a decoy from memory).
    pub async fn ensure_decoy(&self) {
        let path = ObjPath::from(DECOY);
        if self.store.head(&path).await.is_err() {
            let m = bubble_frozen::decoy_manifest();
            if let Err(e) = self.store.put(&path, m.into()).await {
                tracing::warn!(error = %e, "could not store the decoy manifest");
            }
        }
    }

    /// What opening a copy under another key costs, for a copy that does
    /// not exist: reads the store's decoy manifest (`frozen-decoy`, made
    /// at start) and decodes it (refused: its key id is no key's).
    async fn decoy_open(&self, id: &str, generation: u64, kek: &Kek) {
        let raw = match self.store.get(&ObjPath::from(DECOY)).await {
            Ok(r) => r.bytes().await.ok(),
            Err(_) => None,
        };
        match raw {
            Some(raw) => {
                let _ = bubble_frozen::decode_manifest(&raw, id, generation, kek);
            }
            None => bubble_frozen::decoy(kek),
        }
    }

    /// Refuses a copy whose directory holds anything but its manifest, its
    /// chunks and a claim: an object added to a copy is tampering too.
    async fn refuse_unexpected(&self, base: &str, chunks: u64) -> Result<(), BrokerError> {
        use futures::TryStreamExt;
        let dir = ObjPath::from(base);
        let names: Vec<String> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .map_err(store_err)?;
        let expected = |n: &str| {
            n == "manifest"
                || n == "claim"
                || n.strip_prefix("chunk-")
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| i < chunks && n == format!("chunk-{i}"))
        };
        match names.iter().find(|n| !expected(n)) {
            Some(n) => Err(BrokerError::DataLoss(format!(
                "unexpected object {n:?} in the frozen copy"
            ))),
            None => Ok(()),
        }
    }

    /// The chunks of a frozen copy opened with [`FrozenStore::open`], in
    /// order, each read and decrypted (authenticated) in place on the
    /// blocking pool, [`FETCH_AHEAD`] at a time: at most that many are
    /// fetched ahead of the one the caller takes. The caller checks the
    /// total length against the header.
    pub fn fetch_stream(
        &self,
        id: &str,
        generation: u64,
        header: &Header,
        cipher: ChunkCipher,
    ) -> impl futures::Stream<Item = Result<PlainChunk, BrokerError>> + Send + 'static {
        use futures::StreamExt;
        let cipher = Arc::new(cipher);
        let base = prefix(id, generation);
        let (store, pool) = (self.store.clone(), self.buffers.clone());
        futures::stream::iter(0..header.chunks)
            .map(move |i| {
                let (store, cipher, pool) = (store.clone(), cipher.clone(), pool.clone());
                let path = ObjPath::from(format!("{base}/chunk-{i}"));
                async move {
                    let got = match store.get(&path).await {
                        Ok(r) => r,
                        Err(object_store::Error::NotFound { .. }) => {
                            return Err(BrokerError::DataLoss(format!("chunk {i} missing")))
                        }
                        Err(e) => return Err(store_err(e)),
                    };
                    let len = usize::try_from(got.range.end - got.range.start)
                        .ok()
                        .filter(|n| *n <= CHUNK + bubble_keys::envelope::CHUNK_OVERHEAD)
                        .ok_or_else(|| BrokerError::DataLoss(format!("chunk {i} is too large")))?;
                    let mut buf = pool.take(len);
                    let file = match got.payload {
                        object_store::GetResultPayload::File(f, _) => Some((f, got.range.start)),
                        object_store::GetResultPayload::Stream(mut st) => {
                            buf.clear();
                            while let Some(b) = st.next().await {
                                let b = b.map_err(store_err)?;
                                if buf.len() + b.len() > len {
                                    return Err(BrokerError::DataLoss(format!(
                                        "chunk {i} is longer than announced"
                                    )));
                                }
                                buf.extend_from_slice(&b);
                            }
                            None
                        }
                    };
                    // Read (local store) and open in place on the blocking
                    // pool. AES-GCM with the snapshot id and the index as
                    // AAD: a modified, truncated, swapped or reordered chunk
                    // does not authenticate.
                    tokio::task::spawn_blocking(move || {
                        if let Some((f, at)) = file {
                            use std::os::unix::fs::FileExt;
                            f.read_exact_at(&mut buf, at)
                                .map_err(|e| BrokerError::Store(format!("chunk {i}: {e}")))?;
                        }
                        let plain = cipher.decrypt_owned(i, buf).map_err(|_| {
                            BrokerError::DataLoss(format!("chunk {i} does not authenticate"))
                        })?;
                        Ok(PlainChunk {
                            bytes: Some(plain),
                            pool,
                        })
                    })
                    .await
                    .map_err(|e| BrokerError::Store(format!("decrypting chunk {i}: {e}")))?
                }
            })
            .buffered(FETCH_AHEAD)
    }

    /// Consumes a frozen copy after a successful restore.
    pub async fn delete(&self, id: &str, generation: u64, chunks: u64) -> Result<(), BrokerError> {
        let base = prefix(id, generation);
        self.store
            .delete(&ObjPath::from(format!("{base}/manifest")))
            .await
            .map_err(store_err)?;
        // Without its manifest the copy cannot be restored anywhere; the
        // chunks are deleted in the background, off the restore path.
        let store = self.store.clone();
        let root = self.local_root.clone();
        tokio::spawn(async move {
            for i in 0..chunks {
                let _ = store
                    .delete(&ObjPath::from(format!("{base}/chunk-{i}")))
                    .await;
            }
            let _ = store.delete(&ObjPath::from(format!("{base}/claim"))).await;
            // A local store keeps directories: remove the generation's and,
            // if it was the last, the bubble's (only empty ones go).
            if let Some(root) = root {
                let _ =
                    tokio::task::spawn_blocking(move || cas::remove_empty_local_dirs(&root, &base))
                        .await;
            }
        });
        Ok(())
    }
}

/// The pause between chunk writes that a crash test asked for.
#[cfg(feature = "fault-injection")]
fn fault_pause_ms() -> Option<u64> {
    std::env::var("BUBBLED_TEST_CHUNK_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
}
