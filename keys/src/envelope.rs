//! Envelope encryption of frozen (suspended) bubbles.
//!
//! Each snapshot gets a fresh random 256-bit [`DataKey`]. The snapshot is
//! cut into chunks, each encrypted with AES-256-GCM under the data key by
//! [`encrypt_chunk`]:
//!
//! ```text
//! chunk = nonce (12 random bytes) || ciphertext || tag (16 bytes)
//! AAD   = "bubble-v1 chunk" || snapshot_id (16 bytes) || u64 LE chunk_index
//! ```
//!
//! so a chunk cannot be moved to another position or snapshot. The data key
//! is wrapped by a key-encryption key ([`Kek`], held by the host or supplied
//! by the parent) with [`wrap_key`]:
//!
//! ```text
//! wrapped = version (1) || nonce (12) || AES-256-GCM(dk) (32) || tag (16)
//! AAD     = "bubble-v1 key wrap" || version || snapshot_id
//! ```
//!
//! Random 96-bit nonces are safe here: each data key encrypts one snapshot
//! (far fewer than 2^32 chunks), and each KEK wraps one key per snapshot.

use crate::aead::{self, AeadFailure, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use crate::hpke::AeadId;
use crate::secret::SecretBytes;
use alloc::vec::Vec;
use core::fmt;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// Domain prefix of a chunk's AAD.
pub const CHUNK_AAD_DOMAIN: &[u8] = b"bubble-v1 chunk";
/// Domain prefix of a wrapped key's AAD.
pub const WRAP_AAD_DOMAIN: &[u8] = b"bubble-v1 key wrap";
/// Bytes an encrypted chunk adds to its plaintext (nonce + tag).
pub const CHUNK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Version byte of a wrapped data key.
pub const WRAPPED_KEY_VERSION: u8 = 1;
/// Length of a wrapped data key.
pub const WRAPPED_KEY_LEN: usize = 1 + NONCE_LEN + 32 + TAG_LEN;
/// Length of a snapshot id.
pub const SNAPSHOT_ID_LEN: usize = 16;

/// A per-snapshot 256-bit data key; zeroized on drop, never printed.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// Generates a fresh random data key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut k[..]);
        Self(k)
    }

    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut b = bytes;
        let k = Zeroizing::new(b);
        zeroize::Zeroize::zeroize(&mut b);
        Self(k)
    }
}

impl ZeroizeOnDrop for DataKey {}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

/// A 256-bit key-encryption key; zeroized on drop, never printed.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; 32]>);

impl Kek {
    /// Generates a fresh random KEK.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut k[..]);
        Self(k)
    }

    /// A KEK from 32 bytes (e.g. supplied by the parent).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut b = bytes;
        let k = Zeroizing::new(b);
        zeroize::Zeroize::zeroize(&mut b);
        Self(k)
    }

    /// A KEK from a parent-supplied slice, which must be exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != 32 {
            return Err(Error::InvalidLength {
                what: "KEK",
                got: bytes.len(),
                expected: 32,
            });
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(bytes);
        Ok(Self(k))
    }

    /// A public identifier of this KEK (to record which KEK wrapped a
    /// snapshot): the first 16 bytes of SHA-256("bubble-v1 kek id" || kek).
    pub fn key_id(&self) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(b"bubble-v1 kek id");
        h.update(&self.0[..]);
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    }
}

impl ZeroizeOnDrop for Kek {}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

fn chunk_aad(snapshot_id: &[u8; SNAPSHOT_ID_LEN], chunk_index: u64) -> [u8; 39] {
    let mut aad = [0u8; 39];
    aad[..15].copy_from_slice(CHUNK_AAD_DOMAIN);
    aad[15..31].copy_from_slice(snapshot_id);
    aad[31..].copy_from_slice(&chunk_index.to_le_bytes());
    aad
}

fn wrap_aad(snapshot_id: &[u8; SNAPSHOT_ID_LEN]) -> [u8; 35] {
    let mut aad = [0u8; 35];
    aad[..18].copy_from_slice(WRAP_AAD_DOMAIN);
    aad[18] = WRAPPED_KEY_VERSION;
    aad[19..].copy_from_slice(snapshot_id);
    aad
}

/// Encrypts one chunk with a random nonce drawn from `rng`; returns
/// `nonce || ciphertext || tag` (`plaintext.len() + CHUNK_OVERHEAD` bytes).
pub fn encrypt_chunk_with_rng<R: RngCore + CryptoRng>(
    rng: &mut R,
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
    chunk_index: u64,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let aad = chunk_aad(snapshot_id, chunk_index);
    let mut out = Vec::with_capacity(plaintext.len() + CHUNK_OVERHEAD);
    out.extend_from_slice(&nonce);
    // A 32-byte key always fits AES-256-GCM, so sealing cannot fail; if it
    // ever did, the output would be only the nonce and fail to decrypt.
    if let Ok(ct) = aead::seal(AeadId::Aes256Gcm, &dk.0[..], &nonce, &aad, plaintext) {
        out.extend_from_slice(&ct);
    }
    out
}

/// Encrypts one chunk with a nonce from the OS RNG (host only).
#[cfg(feature = "std")]
pub fn encrypt_chunk(
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
    chunk_index: u64,
    plaintext: &[u8],
) -> Vec<u8> {
    encrypt_chunk_with_rng(
        &mut rand_core::OsRng,
        dk,
        snapshot_id,
        chunk_index,
        plaintext,
    )
}

/// Decrypts and authenticates one chunk. Fails with
/// [`Error::Truncated`] if it is shorter than nonce + tag, and with
/// [`Error::ChunkAuthentication`] if it was tampered with or belongs to
/// another key, snapshot or index.
pub fn decrypt_chunk(
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
    chunk_index: u64,
    chunk: &[u8],
) -> Result<SecretBytes, Error> {
    if chunk.len() < CHUNK_OVERHEAD {
        return Err(Error::Truncated {
            what: "chunk",
            got: chunk.len(),
            need: CHUNK_OVERHEAD,
        });
    }
    let (nonce_bytes, ct) = chunk.split_at(NONCE_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(nonce_bytes);
    let aad = chunk_aad(snapshot_id, chunk_index);
    aead::open(AeadId::Aes256Gcm, &dk.0[..], &nonce, &aad, ct).map_err(|e| match e {
        AeadFailure::Truncated => Error::Truncated {
            what: "chunk",
            got: chunk.len(),
            need: CHUNK_OVERHEAD,
        },
        AeadFailure::KeyLength | AeadFailure::Auth => {
            Error::ChunkAuthentication { index: chunk_index }
        }
    })
}

/// Wraps `dk` under `kek` for `snapshot_id` with a nonce drawn from `rng`.
pub fn wrap_key_with_rng<R: RngCore + CryptoRng>(
    rng: &mut R,
    kek: &Kek,
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
) -> [u8; WRAPPED_KEY_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let mut out = [0u8; WRAPPED_KEY_LEN];
    out[0] = WRAPPED_KEY_VERSION;
    out[1..1 + NONCE_LEN].copy_from_slice(&nonce);
    // A 32-byte key always fits AES-256-GCM; on an impossible failure the
    // ciphertext stays zero and will not unwrap.
    if let Ok(ct) = aead::seal(
        AeadId::Aes256Gcm,
        &kek.0[..],
        &nonce,
        &wrap_aad(snapshot_id),
        &dk.0[..],
    ) {
        if ct.len() == WRAPPED_KEY_LEN - 1 - NONCE_LEN {
            out[1 + NONCE_LEN..].copy_from_slice(&ct);
        }
    }
    out
}

/// Wraps `dk` under `kek` with a nonce from the OS RNG (host only).
#[cfg(feature = "std")]
pub fn wrap_key(
    kek: &Kek,
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
) -> [u8; WRAPPED_KEY_LEN] {
    wrap_key_with_rng(&mut rand_core::OsRng, kek, dk, snapshot_id)
}

/// Unwraps a data key wrapped by [`wrap_key`] for `snapshot_id`.
pub fn unwrap_key(
    kek: &Kek,
    wrapped: &[u8],
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
) -> Result<DataKey, Error> {
    if wrapped.len() != WRAPPED_KEY_LEN {
        return Err(Error::InvalidLength {
            what: "wrapped key",
            got: wrapped.len(),
            expected: WRAPPED_KEY_LEN,
        });
    }
    if wrapped[0] != WRAPPED_KEY_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "wrapped key",
            version: wrapped[0],
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
    let pt = aead::open(
        AeadId::Aes256Gcm,
        &kek.0[..],
        &nonce,
        &wrap_aad(snapshot_id),
        &wrapped[1 + NONCE_LEN..],
    )
    .map_err(|_| Error::UnwrapFailed)?;
    let bytes: &[u8; 32] = pt.expose().try_into().map_err(|_| Error::UnwrapFailed)?;
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(bytes);
    Ok(DataKey(k))
}

#[cfg(feature = "std")]
mod file;
#[cfg(feature = "std")]
pub use file::KekFileError;
