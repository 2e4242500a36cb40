//! Writing a frozen copy as its snapshot streams in: each 1 MiB of
//! plaintext is encrypted and stored as soon as it is complete, so a
//! suspend holds one chunk of guest memory, whatever the bubble's size.

use bubble_keys::envelope::ChunkCipher;
use bubble_keys::{DataKey, Kek, OsRng, RngCore, SNAPSHOT_ID_LEN};
use bubble_vmm::snapshot::Scanner;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use zeroize::Zeroizing;

use super::{prefix, store_err, FrozenStore, Header, Manifest, CHUNK, FORMAT, HEADER_INDEX};
use crate::error::BrokerError;

/// A frozen copy being written: [`FrozenWriter::push`] the snapshot's
/// bytes as they come, then [`FrozenWriter::finish`] writes the manifest.
/// Dropped unfinished, it leaves chunks without a manifest (garbage that
/// nobody can restore; the caller purges them).
pub struct FrozenWriter<'s> {
    store: &'s FrozenStore,
    header: Header,
    base: String,
    sid: [u8; SNAPSHOT_ID_LEN],
    cipher: ChunkCipher,
    wrapped_key: Vec<u8>,
    kek_id: String,
    kek_kind: &'static str,
    /// The chunk being filled (plaintext guest memory: wiped on drop).
    buf: Zeroizing<Vec<u8>>,
    /// Chunks stored so far.
    stored: u64,
    /// Checks the snapshot's structure and collects its page runs.
    scanner: Scanner,
}

impl FrozenStore {
    /// Starts a frozen copy of generation `header.generation`, under a
    /// fresh data key wrapped by `kek` (the parent's if `parent_key`).
    pub fn writer(&self, header: Header, kek: &Kek, parent_key: bool) -> FrozenWriter<'_> {
        let mut sid = [0u8; SNAPSHOT_ID_LEN];
        OsRng.fill_bytes(&mut sid);
        let dk = DataKey::generate(&mut OsRng);
        let mem_size = u64::from(header.memory_mib) << 20;
        FrozenWriter {
            store: self,
            base: prefix(&header.bubble_id, header.generation),
            header,
            sid,
            cipher: ChunkCipher::new(&dk, &sid),
            wrapped_key: bubble_keys::wrap_key(kek, &dk, &sid).to_vec(),
            kek_id: hex::encode(kek.key_id()),
            kek_kind: if parent_key { "parent" } else { "broker" },
            buf: Zeroizing::new(Vec::with_capacity(CHUNK)),
            stored: 0,
            scanner: Scanner::expecting(mem_size),
        }
    }
}

impl FrozenWriter<'_> {
    /// Takes the next bytes of the snapshot; stores every chunk they
    /// complete. A snapshot that breaks its format is refused here.
    pub async fn push(&mut self, mut b: &[u8]) -> Result<(), BrokerError> {
        self.scanner
            .feed(b)
            .map_err(|e| BrokerError::BubbleFailed(format!("snapshot: {e}")))?;
        while !b.is_empty() {
            let k = (CHUNK - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.buf.len() == CHUNK {
                self.store_chunk().await?;
            }
        }
        Ok(())
    }

    /// Encrypts and stores the chunk being filled.
    async fn store_chunk(&mut self) -> Result<(), BrokerError> {
        let i = self.stored;
        // Fault injection for crash tests (test builds only): a pause
        // between chunk writes.
        #[cfg(feature = "fault-injection")]
        if let (Some(ms), true) = (super::fault_pause_ms(), i > 0) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let ct = self.cipher.encrypt(i, &self.buf);
        self.buf.clear();
        self.store
            .store
            .put(
                &ObjPath::from(format!("{}/chunk-{i}", self.base)),
                PutPayload::from(ct),
            )
            .await
            .map_err(store_err)?;
        self.stored += 1;
        Ok(())
    }

    /// Stores the last chunk and then the manifest (sealed header: length,
    /// chunk count, page runs, key kind) and makes a local copy durable;
    /// returns the number of chunks.
    pub async fn finish(mut self) -> Result<u64, BrokerError> {
        if !self.buf.is_empty() {
            self.store_chunk().await?;
        }
        let scanned = std::mem::take(&mut self.scanner)
            .finish()
            .map_err(|e| BrokerError::BubbleFailed(format!("snapshot: {e}")))?;
        let mut header = self.header.clone();
        header.total_len = scanned.len;
        header.chunks = self.stored;
        header.page_runs = scanned.runs;
        header.kek = self.kek_kind.into();
        let sealed = self.cipher.encrypt(HEADER_INDEX, &to_json(&header)?);
        let m = Manifest {
            format: FORMAT,
            snapshot_id: hex::encode(self.sid),
            wrapped_key: hex::encode(&self.wrapped_key),
            kek: self.kek_kind.into(),
            kek_id: self.kek_id.clone(),
            header: hex::encode(sealed),
        };
        self.store
            .store
            .put(
                &ObjPath::from(format!("{}/manifest", self.base)),
                PutPayload::from(to_json(&m)?),
            )
            .await
            .map_err(store_err)?;
        self.store.sync_local(&self.base, header.chunks).await?;
        Ok(header.chunks)
    }
}

fn to_json(v: &impl serde::Serialize) -> Result<Vec<u8>, BrokerError> {
    serde_json::to_vec(v).map_err(|e| BrokerError::Store(e.to_string()))
}
