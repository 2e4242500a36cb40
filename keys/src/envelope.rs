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
//! [`ChunkCipher`] prepares a data key once for many chunks.
//!
//! Random 96-bit nonces are safe here: each data key encrypts one snapshot
//! (far fewer than 2^32 chunks), and each KEK wraps one key per snapshot.

use crate::aead::{self, NONCE_LEN, TAG_LEN};
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

/// A data key prepared for one snapshot's chunks (the AES key schedule is
/// computed once). The free functions [`encrypt_chunk`] and
/// [`decrypt_chunk`] build one per call; use this for many small chunks.
///
/// With the `std` feature the AEAD is ring's AES-256-GCM (several times
/// faster on the host; ring does not zeroize its key schedule when it is
/// dropped); without it, RustCrypto's `aes-gcm`, whose key schedule is
/// zeroized. Both produce the same, standard AES-256-GCM output.
pub struct ChunkCipher {
    key: backend::Key,
    snapshot_id: [u8; SNAPSHOT_ID_LEN],
}

impl ChunkCipher {
    /// Prepares `dk` for the chunks of `snapshot_id`.
    pub fn new(dk: &DataKey, snapshot_id: &[u8; SNAPSHOT_ID_LEN]) -> Self {
        Self {
            key: backend::Key::new(&dk.0),
            snapshot_id: *snapshot_id,
        }
    }

    /// Encrypts one chunk with a random nonce drawn from `rng`; returns
    /// `nonce || ciphertext || tag` (`plaintext.len() + CHUNK_OVERHEAD`).
    pub fn encrypt_with_rng<R: RngCore + CryptoRng>(
        &self,
        rng: &mut R,
        chunk_index: u64,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let aad = chunk_aad(&self.snapshot_id, chunk_index);
        let mut out = Vec::with_capacity(plaintext.len() + CHUNK_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self.key.seal(&nonce, &aad, &mut out[NONCE_LEN..]);
        out.extend_from_slice(&tag);
        out
    }

    /// Encrypts one chunk with a nonce from the OS RNG (host only).
    #[cfg(feature = "std")]
    pub fn encrypt(&self, chunk_index: u64, plaintext: &[u8]) -> Vec<u8> {
        self.encrypt_with_rng(&mut rand_core::OsRng, chunk_index, plaintext)
    }

    /// Decrypts and authenticates one chunk into `out`, which must be
    /// exactly `chunk.len() - CHUNK_OVERHEAD` bytes. On error `out` is
    /// left zeroed.
    pub fn decrypt_into(
        &self,
        chunk_index: u64,
        chunk: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        if chunk.len() < CHUNK_OVERHEAD {
            out.fill(0);
            return Err(Error::Truncated {
                what: "chunk",
                got: chunk.len(),
                need: CHUNK_OVERHEAD,
            });
        }
        let body_len = chunk.len() - CHUNK_OVERHEAD;
        if out.len() != body_len {
            out.fill(0);
            return Err(Error::InvalidLength {
                what: "chunk output buffer",
                got: out.len(),
                expected: body_len,
            });
        }
        let (nonce_bytes, rest) = chunk.split_at(NONCE_LEN);
        let (body, tag_bytes) = rest.split_at(body_len);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(nonce_bytes);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(tag_bytes);
        out.copy_from_slice(body);
        let aad = chunk_aad(&self.snapshot_id, chunk_index);
        if self.key.open(&nonce, &aad, out, &tag) {
            Ok(())
        } else {
            out.fill(0);
            Err(Error::ChunkAuthentication { index: chunk_index })
        }
    }

    /// Decrypts and authenticates one chunk in its own buffer (no second
    /// allocation): `chunk` (`nonce || ciphertext || tag`) becomes the
    /// plaintext, a secret. On error the buffer is zeroized and dropped.
    pub fn decrypt_owned(&self, chunk_index: u64, chunk: Vec<u8>) -> Result<SecretBytes, Error> {
        let mut buf = SecretBytes::new(chunk);
        let b = buf.expose_mut();
        if b.len() < CHUNK_OVERHEAD {
            return Err(Error::Truncated {
                what: "chunk",
                got: b.len(),
                need: CHUNK_OVERHEAD,
            });
        }
        let body_len = b.len() - CHUNK_OVERHEAD;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[..NONCE_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[NONCE_LEN + body_len..]);
        let aad = chunk_aad(&self.snapshot_id, chunk_index);
        if !self
            .key
            .open(&nonce, &aad, &mut b[NONCE_LEN..NONCE_LEN + body_len], &tag)
        {
            return Err(Error::ChunkAuthentication { index: chunk_index });
        }
        b.copy_within(NONCE_LEN..NONCE_LEN + body_len, 0);
        buf.truncate(body_len);
        Ok(buf)
    }

    /// Decrypts and authenticates one chunk; the plaintext is a secret.
    pub fn decrypt(&self, chunk_index: u64, chunk: &[u8]) -> Result<SecretBytes, Error> {
        let len = chunk.len().saturating_sub(CHUNK_OVERHEAD);
        let mut out = SecretBytes::new(alloc::vec![0u8; len]);
        self.decrypt_into(chunk_index, chunk, out.expose_mut())?;
        Ok(out)
    }
}

impl fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCipher")
            .field("snapshot_id", &crate::fmt_util::Hex(&self.snapshot_id))
            .field("key", &"[REDACTED]")
            .finish()
    }
}

/// The chunk AEAD: ring on the host (speed), RustCrypto without `std`.
#[cfg(feature = "std")]
mod backend {
    use super::{NONCE_LEN, TAG_LEN};
    use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

    pub(super) struct Key(Option<LessSafeKey>);

    impl Key {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            // ring refuses only a key of the wrong length; ours is 32 bytes.
            // Should it ever refuse, every seal yields an unopenable chunk
            // and every open fails.
            Self(
                UnboundKey::new(&AES_256_GCM, key)
                    .ok()
                    .map(LessSafeKey::new),
            )
        }

        pub(super) fn seal(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
        ) -> [u8; TAG_LEN] {
            let mut out = [0u8; TAG_LEN];
            let tag = self.0.as_ref().and_then(|k| {
                k.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    buf,
                )
                .ok()
            });
            match tag {
                Some(t) => out.copy_from_slice(t.as_ref()),
                None => buf.fill(0),
            }
            out
        }

        pub(super) fn open(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
            tag: &[u8; TAG_LEN],
        ) -> bool {
            let Some(k) = self.0.as_ref() else {
                return false;
            };
            k.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                Tag::from(*tag),
                buf,
                0..,
            )
            .is_ok()
        }
    }
}

/// The chunk AEAD: ring on the host (speed), RustCrypto without `std`.
#[cfg(not(feature = "std"))]
mod backend {
    use super::{NONCE_LEN, TAG_LEN};
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use aes_gcm::Aes256Gcm;

    pub(super) struct Key(Aes256Gcm);

    impl Key {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            Self(Aes256Gcm::new(key.into()))
        }

        pub(super) fn seal(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
        ) -> [u8; TAG_LEN] {
            let mut out = [0u8; TAG_LEN];
            match self.0.encrypt_in_place_detached(nonce.into(), aad, buf) {
                Ok(t) => out.copy_from_slice(&t),
                Err(_) => buf.fill(0),
            }
            out
        }

        pub(super) fn open(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            buf: &mut [u8],
            tag: &[u8; TAG_LEN],
        ) -> bool {
            self.0
                .decrypt_in_place_detached(nonce.into(), aad, buf, tag.into())
                .is_ok()
        }
    }
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
    ChunkCipher::new(dk, snapshot_id).encrypt_with_rng(rng, chunk_index, plaintext)
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
    ChunkCipher::new(dk, snapshot_id).decrypt(chunk_index, chunk)
}

/// Like [`decrypt_chunk`], but decrypts into `out`, which must be exactly
/// `chunk.len() - CHUNK_OVERHEAD` bytes (no allocation). On any error `out`
/// is left zeroed.
pub fn decrypt_chunk_into(
    dk: &DataKey,
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
    chunk_index: u64,
    chunk: &[u8],
    out: &mut [u8],
) -> Result<(), Error> {
    ChunkCipher::new(dk, snapshot_id).decrypt_into(chunk_index, chunk, out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestRng;
    use alloc::format;
    use alloc::vec;

    const SNAP: [u8; 16] = [0xab; 16];

    fn dk(seed: u64) -> DataKey {
        DataKey::generate(&mut TestRng::new(seed))
    }

    #[test]
    fn chunk_round_trip_and_sizes() {
        let mut rng = TestRng::new(20);
        let k = dk(1);
        for len in [0usize, 1, 4095, 4096, 65_536] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 5, &pt);
            assert_eq!(c.len(), len + CHUNK_OVERHEAD);
            if len >= 64 {
                assert!(!c.windows(64).any(|w| w == &pt[..64]));
            }
            let back = decrypt_chunk(&k, &SNAP, 5, &c).unwrap();
            assert_eq!(back.expose(), &pt[..]);
        }
    }

    #[test]
    fn nonces_are_random() {
        let mut rng = TestRng::new(21);
        let k = dk(1);
        let a = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 0, b"same");
        let b = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 0, b"same");
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_index_snapshot_or_key_is_rejected() {
        let mut rng = TestRng::new(22);
        let k = dk(1);
        let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 7, b"page");
        assert_eq!(
            decrypt_chunk(&k, &SNAP, 8, &c).unwrap_err(),
            Error::ChunkAuthentication { index: 8 }
        );
        assert_eq!(
            decrypt_chunk(&k, &SNAP, u64::MAX, &c).unwrap_err(),
            Error::ChunkAuthentication { index: u64::MAX }
        );
        let mut other_snap = SNAP;
        other_snap[15] ^= 1;
        assert!(matches!(
            decrypt_chunk(&k, &other_snap, 7, &c),
            Err(Error::ChunkAuthentication { .. })
        ));
        assert!(matches!(
            decrypt_chunk(&dk(2), &SNAP, 7, &c),
            Err(Error::ChunkAuthentication { .. })
        ));
        // Two chunks swapped in the store.
        let c0 = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 0, b"zero");
        let c1 = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 1, b"one!");
        assert!(decrypt_chunk(&k, &SNAP, 0, &c1).is_err());
        assert!(decrypt_chunk(&k, &SNAP, 1, &c0).is_err());
    }

    #[test]
    fn decrypt_owned_matches_decrypt_and_rejects_the_same_inputs() {
        let mut rng = TestRng::new(25);
        let k = dk(1);
        let cipher = ChunkCipher::new(&k, &SNAP);
        for len in [0usize, 1, 4095, 4104, 65_536] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let c = cipher.encrypt_with_rng(&mut rng, 9, &pt);
            let owned = cipher.decrypt_owned(9, c.clone()).unwrap();
            assert_eq!(owned.expose(), &pt[..]);
            assert_eq!(owned.expose(), cipher.decrypt(9, &c).unwrap().expose());
            assert_eq!(
                cipher.decrypt_owned(10, c.clone()).unwrap_err(),
                Error::ChunkAuthentication { index: 10 }
            );
            let mut t = c.clone();
            t[c.len() / 2] ^= 0x40;
            assert!(cipher.decrypt_owned(9, t).is_err());
            for n in [0, CHUNK_OVERHEAD - 1, c.len() - 1] {
                assert!(cipher.decrypt_owned(9, c[..n].to_vec()).is_err(), "{n}");
            }
        }
    }

    #[test]
    fn every_bit_flip_of_a_chunk_is_rejected() {
        let mut rng = TestRng::new(23);
        let k = dk(1);
        let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 3, b"guest memory page bytes");
        for byte in 0..c.len() {
            for bit in 0..8 {
                let mut t = c.clone();
                t[byte] ^= 1 << bit;
                assert_eq!(
                    decrypt_chunk(&k, &SNAP, 3, &t).unwrap_err(),
                    Error::ChunkAuthentication { index: 3 },
                    "{byte}/{bit}"
                );
            }
        }
    }

    #[test]
    fn truncated_and_extended_chunks_are_rejected() {
        let mut rng = TestRng::new(24);
        let k = dk(1);
        let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 0, b"0123456789");
        for n in 0..c.len() {
            let err = decrypt_chunk(&k, &SNAP, 0, &c[..n]).unwrap_err();
            if n < CHUNK_OVERHEAD {
                assert_eq!(
                    err,
                    Error::Truncated {
                        what: "chunk",
                        got: n,
                        need: CHUNK_OVERHEAD
                    }
                );
            } else {
                assert_eq!(err, Error::ChunkAuthentication { index: 0 });
            }
        }
        let mut longer = c.clone();
        longer.push(0);
        assert!(decrypt_chunk(&k, &SNAP, 0, &longer).is_err());
        // An empty-plaintext chunk is exactly the overhead and valid.
        let e = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 1, b"");
        assert_eq!(e.len(), CHUNK_OVERHEAD);
        assert!(decrypt_chunk(&k, &SNAP, 1, &e).unwrap().is_empty());
    }

    #[test]
    fn wrap_round_trip_and_binding() {
        let mut rng = TestRng::new(25);
        let kek = Kek::generate(&mut rng);
        let k = DataKey::generate(&mut rng);
        let w = wrap_key_with_rng(&mut rng, &kek, &k, &SNAP);
        assert_eq!(w.len(), WRAPPED_KEY_LEN);
        assert_eq!(w[0], WRAPPED_KEY_VERSION);
        assert!(!w.windows(32).any(|x| x == &k.0[..]));
        let back = unwrap_key(&kek, &w, &SNAP).unwrap();
        assert_eq!(*back.0, *k.0);
        // The unwrapped key decrypts what the original encrypted.
        let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 0, b"x");
        assert_eq!(decrypt_chunk(&back, &SNAP, 0, &c).unwrap().expose(), b"x");

        let mut other_snap = SNAP;
        other_snap[0] ^= 0x80;
        assert_eq!(
            unwrap_key(&kek, &w, &other_snap).unwrap_err(),
            Error::UnwrapFailed
        );
        let other_kek = Kek::generate(&mut rng);
        assert_eq!(
            unwrap_key(&other_kek, &w, &SNAP).unwrap_err(),
            Error::UnwrapFailed
        );
        // Fresh nonce per wrap.
        let w2 = wrap_key_with_rng(&mut rng, &kek, &k, &SNAP);
        assert_ne!(w, w2);
    }

    #[test]
    fn every_bit_flip_and_bad_length_of_a_wrapped_key_is_rejected() {
        let mut rng = TestRng::new(26);
        let kek = Kek::generate(&mut rng);
        let k = DataKey::generate(&mut rng);
        let w = wrap_key_with_rng(&mut rng, &kek, &k, &SNAP);
        for byte in 0..w.len() {
            for bit in 0..8 {
                let mut t = w;
                t[byte] ^= 1 << bit;
                let err = unwrap_key(&kek, &t, &SNAP).unwrap_err();
                if byte == 0 {
                    assert!(matches!(err, Error::UnsupportedVersion { .. }));
                } else {
                    assert_eq!(err, Error::UnwrapFailed);
                }
            }
        }
        for n in [0usize, 1, 28, WRAPPED_KEY_LEN - 1, WRAPPED_KEY_LEN + 1] {
            let mut v = vec![0u8; n];
            let m = n.min(WRAPPED_KEY_LEN);
            v[..m].copy_from_slice(&w[..m]);
            assert_eq!(
                unwrap_key(&kek, &v, &SNAP).unwrap_err(),
                Error::InvalidLength {
                    what: "wrapped key",
                    got: n,
                    expected: WRAPPED_KEY_LEN
                }
            );
        }
    }

    #[test]
    fn kek_from_parent_bytes_and_key_id() {
        let bytes = [7u8; 32];
        let a = Kek::from_slice(&bytes).unwrap();
        let b = Kek::from_bytes(bytes);
        assert_eq!(a.key_id(), b.key_id());
        assert_ne!(a.key_id(), Kek::from_bytes([8u8; 32]).key_id());
        for n in [0usize, 16, 31, 33, 64] {
            assert_eq!(
                Kek::from_slice(&vec![1u8; n]).unwrap_err(),
                Error::InvalidLength {
                    what: "KEK",
                    got: n,
                    expected: 32
                }
            );
        }
        // A KEK from bytes wraps and unwraps like a generated one.
        let mut rng = TestRng::new(27);
        let k = DataKey::from_bytes([9u8; 32]);
        let w = wrap_key_with_rng(&mut rng, &a, &k, &SNAP);
        assert_eq!(*unwrap_key(&b, &w, &SNAP).unwrap().0, [9u8; 32]);
    }

    #[test]
    fn debug_never_leaks() {
        let secret = [0x5au8; 32];
        let kek = Kek::from_bytes(secret);
        let k = DataKey::from_bytes(secret);
        for d in [format!("{kek:?}"), format!("{k:?}")] {
            assert!(d.contains("REDACTED"), "{d}");
            assert!(!d.contains("5a5a"), "{d}");
            assert!(!d.contains("90"), "{d}");
        }
    }

    #[test]
    fn chunk_cipher_matches_free_functions_and_decrypts_into() {
        let mut rng = TestRng::new(28);
        let k = dk(3);
        let cc = ChunkCipher::new(&k, &SNAP);
        let c = cc.encrypt_with_rng(&mut rng, 4, b"page four");
        assert_eq!(
            decrypt_chunk(&k, &SNAP, 4, &c).unwrap().expose(),
            b"page four"
        );
        let c2 = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 5, b"page five");
        assert_eq!(cc.decrypt(5, &c2).unwrap().expose(), b"page five");
        let mut out = [0xffu8; 9];
        decrypt_chunk_into(&k, &SNAP, 5, &c2, &mut out).unwrap();
        assert_eq!(&out, b"page five");
        // Wrong index: error and a zeroed buffer.
        let mut out = [0xffu8; 9];
        assert_eq!(
            cc.decrypt_into(6, &c2, &mut out).unwrap_err(),
            Error::ChunkAuthentication { index: 6 }
        );
        assert_eq!(out, [0u8; 9]);
        // Wrong output length.
        let mut small = [0xffu8; 8];
        assert!(matches!(
            cc.decrypt_into(5, &c2, &mut small),
            Err(Error::InvalidLength { .. })
        ));
        assert_eq!(small, [0u8; 8]);
        let d = format!("{cc:?}");
        assert!(
            d.contains("REDACTED") && !d.contains(&hex::encode(*k.0)),
            "{d}"
        );
    }

    /// The chunk backend (ring with `std`) and the RustCrypto AEAD produce
    /// and accept the same AES-256-GCM bytes.
    #[test]
    fn chunk_backend_interoperates_with_rustcrypto_aes_gcm() {
        let mut rng = TestRng::new(29);
        let k = dk(4);
        let pt: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
        let c = encrypt_chunk_with_rng(&mut rng, &k, &SNAP, 9, &pt);
        let nonce: [u8; NONCE_LEN] = c[..NONCE_LEN].try_into().unwrap();
        let aad = chunk_aad(&SNAP, 9);
        let opened =
            aead::open(AeadId::Aes256Gcm, &k.0[..], &nonce, &aad, &c[NONCE_LEN..]).unwrap();
        assert_eq!(opened.expose(), &pt[..]);
        let ct = aead::seal(AeadId::Aes256Gcm, &k.0[..], &nonce, &aad, &pt).unwrap();
        assert_eq!(ct, c[NONCE_LEN..]);
        let mut framed = nonce.to_vec();
        framed.extend_from_slice(&ct);
        assert_eq!(
            decrypt_chunk(&k, &SNAP, 9, &framed).unwrap().expose(),
            &pt[..]
        );
    }

    /// Known answer: NIST-style AES-256-GCM with an all-zero key, nonce and
    /// one zero block (the published GCM test case 14) through the chunk
    /// path.
    #[test]
    fn chunk_aes256gcm_known_answer() {
        let k = DataKey::from_bytes([0u8; 32]);
        let cc = ChunkCipher {
            key: backend::Key::new(&k.0),
            snapshot_id: SNAP,
        };
        let mut buf = [0u8; 16];
        let tag = cc.key.seal(&[0u8; NONCE_LEN], b"", &mut buf);
        assert_eq!(hex::encode(buf), "cea7403d4d606b6e074ec5d3baf39d18");
        assert_eq!(hex::encode(tag), "d0d1c8a799996bf0265b98b5d48ab919");
    }

    #[cfg(feature = "std")]
    mod files {
        use super::super::*;
        use super::SNAP;
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
            let c = encrypt_chunk(&k, &SNAP, 0, b"frozen");
            let k2 = unwrap_key(&Kek::load(&path).unwrap(), &w, &SNAP).unwrap();
            assert_eq!(
                decrypt_chunk(&k2, &SNAP, 0, &c).unwrap().expose(),
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
}
