//! The frozen-bubble manifest (`docs/frozen-format.md`): its types and
//! [`decode_manifest`], a pure function from the manifest's bytes and a
//! key-encryption key to the authenticated header and the chunk cipher.
//! The broker reads the bytes from its store and calls it; `frozen/fuzz`
//! feeds it arbitrary bytes.

#![forbid(unsafe_code)]

use bubble_keys::envelope::ChunkCipher;
use bubble_keys::{Kek, SNAPSHOT_ID_LEN};
use serde::{Deserialize, Serialize};

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunk index of the sealed manifest header.
pub const HEADER_INDEX: u64 = u64::MAX;
/// Manifest format version.
pub const FORMAT: u32 = 1;

/// The outer manifest (plaintext JSON).
#[derive(Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Hex of the snapshot id (AAD of every chunk and of the key wrap).
    pub snapshot_id: String,
    /// Hex of the data key wrapped by the key-encryption key.
    pub wrapped_key: String,
    /// Whose key wraps the data key: `broker` or `parent`.
    pub kek: String,
    /// Hex of the key-encryption key's id.
    pub kek_id: String,
    /// Hex of the [`Header`] sealed under the data key as chunk
    /// [`HEADER_INDEX`].
    pub header: String,
}

/// The sealed header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bubble id.
    pub bubble_id: String,
    /// Owner.
    pub owner: String,
    /// Generation.
    pub generation: u64,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest image name.
    pub image: String,
    /// Snapshot length in bytes.
    pub total_len: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Runs of captured pages (guest address, pages): a restoring VMM
    /// faults them in while the chunks are fetched. Absent in copies made
    /// before it existed (then nothing is faulted in ahead).
    #[serde(default)]
    pub page_runs: Vec<(u64, u64)>,
    /// Whose key wraps the data key (`broker` or `parent`): the manifest's
    /// plaintext `kek` field must say the same. Empty in copies made
    /// before it was sealed here.
    #[serde(default)]
    pub kek: String,
}

/// Why a manifest does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The key is not the one the copy was sealed with.
    #[error("the key does not open this frozen bubble")]
    WrongKey,
    /// The manifest is malformed, does not authenticate, or names another
    /// bubble or generation.
    #[error("frozen bubble is damaged: {0}")]
    Damaged(String),
}

/// Decodes and authenticates the manifest of generation `generation` of
/// bubble `id` with `kek`: the sealed header (checked against `id`,
/// `generation`, its own length and chunk count, and the plaintext key
/// kind) and the cipher for the chunks. Any input: no panic.
pub fn decode_manifest(
    raw: &[u8],
    id: &str,
    generation: u64,
    kek: &Kek,
) -> Result<(Header, ChunkCipher), ManifestError> {
    let loss = |m: String| ManifestError::Damaged(m);
    let m: Manifest = serde_json::from_slice(raw).map_err(|e| loss(format!("manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(loss(format!("unknown format {}", m.format)));
    }
    let sid: [u8; SNAPSHOT_ID_LEN] = hex::decode(&m.snapshot_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| loss("bad snapshot id".into()))?;
    if hex::encode(kek.key_id()) != m.kek_id {
        return Err(ManifestError::WrongKey);
    }
    let wrapped = hex::decode(&m.wrapped_key).map_err(|_| loss("bad wrapped key".into()))?;
    let dk = bubble_keys::unwrap_key(kek, &wrapped, &sid).map_err(|_| ManifestError::WrongKey)?;
    let cipher = ChunkCipher::new(&dk, &sid);
    let sealed = hex::decode(&m.header).map_err(|_| loss("bad header".into()))?;
    let hbytes = cipher
        .decrypt(HEADER_INDEX, &sealed)
        .map_err(|_| loss("manifest header does not authenticate".into()))?;
    let header: Header =
        serde_json::from_slice(hbytes.expose()).map_err(|e| loss(format!("header: {e}")))?;
    if header.bubble_id != id || header.generation != generation {
        return Err(loss(
            "manifest belongs to another bubble or generation".into(),
        ));
    }
    if header.chunks != header.total_len.div_ceil(CHUNK as u64) {
        return Err(loss("chunk count differs from the length".into()));
    }
    if !header.kek.is_empty() && header.kek != m.kek {
        return Err(loss(
            "the manifest's key kind differs from its sealed header".into(),
        ));
    }
    Ok((header, cipher))
}
