//! The frozen-bubble manifest (`docs/frozen-format.md`): its types and
//! [`decode_manifest`], a pure function from the manifest's bytes and a
//! key-encryption key to the authenticated header and the chunk cipher.
//! The broker reads the bytes from its store and calls it; `frozen/fuzz`
//! feeds it arbitrary bytes.

#![forbid(unsafe_code)]

use bubble_keys::envelope::ChunkCipher;
use bubble_keys::{DataKey, Kek, SNAPSHOT_ID_LEN, WRAPPED_KEY_LEN};
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
    // Every refusal before the header opens does the key unwrap and the
    // header decryption it skipped on a decoy ([`decoy`]), so that a
    // foreign key, a damaged copy and (in the broker) a missing one cost
    // about the same: their times are no oracle.
    let refuse = |e: ManifestError| {
        decoy(kek);
        e
    };
    let loss = |m: String| refuse(ManifestError::Damaged(m));
    let m: Manifest = serde_json::from_slice(raw).map_err(|e| loss(format!("manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(loss(format!("unknown format {}", m.format)));
    }
    let sid: [u8; SNAPSHOT_ID_LEN] = hex::decode(&m.snapshot_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| loss("bad snapshot id".into()))?;
    if hex::encode(kek.key_id()) != m.kek_id {
        return Err(refuse(ManifestError::WrongKey));
    }
    let wrapped = hex::decode(&m.wrapped_key).map_err(|_| loss("bad wrapped key".into()))?;
    let sealed = hex::decode(&m.header).map_err(|_| loss("bad header".into()))?;
    let dk = match bubble_keys::unwrap_key(kek, &wrapped, &sid) {
        Ok(dk) => dk,
        Err(_) => {
            // The unwrap was done; the header decryption is not.
            decrypt_decoy(&sealed);
            return Err(ManifestError::WrongKey);
        }
    };
    let cipher = ChunkCipher::new(&dk, &sid);
    let hbytes = cipher
        .decrypt(HEADER_INDEX, &sealed)
        .map_err(|_| ManifestError::Damaged("manifest header does not authenticate".into()))?;
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

/// A manifest of a typical size that opens with no key (its key id is
/// zero): a store that has no copy reads and decodes this instead, so
/// that a missing copy costs what a copy under another key costs.
pub fn decoy_manifest() -> Vec<u8> {
    let m = Manifest {
        format: FORMAT,
        snapshot_id: hex::encode([0u8; SNAPSHOT_ID_LEN]),
        wrapped_key: hex::encode([0u8; WRAPPED_KEY_LEN]),
        kek: "broker".into(),
        kek_id: hex::encode([0u8; 16]),
        header: hex::encode([0u8; DECOY_SEALED_LEN]),
    };
    serde_json::to_vec(&m).unwrap_or_default()
}

/// Bytes of a typical sealed header (what [`decoy`] decrypts).
const DECOY_SEALED_LEN: usize = 640;

/// The work of opening a manifest, on nothing: one key unwrap attempt and
/// one header decryption of a typical size, both failing. A refusal that
/// did not get that far (no copy, a foreign key, an unparsable manifest)
/// does it, so that its time does not say which it was.
pub fn decoy(kek: &Kek) {
    let sid = [0u8; SNAPSHOT_ID_LEN];
    let _ = std::hint::black_box(bubble_keys::unwrap_key(kek, &[0u8; WRAPPED_KEY_LEN], &sid));
    decrypt_decoy(&[0u8; DECOY_SEALED_LEN]);
}

/// A header decryption that fails, under a throwaway key.
fn decrypt_decoy(sealed: &[u8]) {
    let sid = [0u8; SNAPSHOT_ID_LEN];
    let cipher = ChunkCipher::new(&DataKey::from_bytes([0u8; 32]), &sid);
    let _ = std::hint::black_box(cipher.decrypt(HEADER_INDEX, std::hint::black_box(sealed)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use bubble_keys::OsRng;

    fn sealed(kek: &Kek, header: &Header, kind: &str) -> Vec<u8> {
        let sid = [3u8; SNAPSHOT_ID_LEN];
        let dk = DataKey::generate(&mut OsRng);
        let cipher = ChunkCipher::new(&dk, &sid);
        let h = serde_json::to_vec(header).unwrap();
        let m = Manifest {
            format: FORMAT,
            snapshot_id: hex::encode(sid),
            wrapped_key: hex::encode(bubble_keys::wrap_key(kek, &dk, &sid)),
            kek: kind.into(),
            kek_id: hex::encode(kek.key_id()),
            header: hex::encode(cipher.encrypt(HEADER_INDEX, &h)),
        };
        serde_json::to_vec(&m).unwrap()
    }

    fn header() -> Header {
        Header {
            bubble_id: "b1".into(),
            owner: "o".into(),
            generation: 2,
            memory_mib: 16,
            image: "shim".into(),
            total_len: (CHUNK as u64) + 1,
            chunks: 2,
            page_runs: vec![(0, 1)],
            kek: "broker".into(),
        }
    }

    #[test]
    fn a_manifest_opens_with_its_key_only_and_for_its_bubble_only() {
        let kek = Kek::generate(&mut OsRng);
        let raw = sealed(&kek, &header(), "broker");
        assert_eq!(decode_manifest(&raw, "b1", 2, &kek).unwrap().0, header());
        let other = Kek::generate(&mut OsRng);
        assert_eq!(
            decode_manifest(&raw, "b1", 2, &other).err(),
            Some(ManifestError::WrongKey)
        );
        assert!(matches!(
            decode_manifest(&raw, "b2", 2, &kek),
            Err(ManifestError::Damaged(_))
        ));
        assert!(matches!(
            decode_manifest(&raw, "b1", 1, &kek),
            Err(ManifestError::Damaged(_))
        ));
        // The plaintext key kind must match the sealed one.
        let relabelled = sealed(&kek, &header(), "parent");
        assert!(matches!(
            decode_manifest(&relabelled, "b1", 2, &kek),
            Err(ManifestError::Damaged(_))
        ));
        // Every single-byte change is refused or opens the same header.
        for i in 0..raw.len() {
            let mut m = raw.clone();
            m[i] ^= 0x01;
            if let Ok((h, _)) = decode_manifest(&m, "b1", 2, &kek) {
                assert_eq!(h, header(), "byte {i}");
            }
        }
    }
}
