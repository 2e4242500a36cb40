//! Chunks of a frozen bubble: [`ChunkCipher`].

use super::{DataKey, CHUNK_AAD_DOMAIN, CHUNK_OVERHEAD, SNAPSHOT_ID_LEN};
use crate::aead::{FastKey, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use crate::secret::SecretBytes;
use alloc::vec::Vec;
use core::fmt;
use rand_core::{CryptoRng, RngCore};

/// Length of a chunk's AAD.
const CHUNK_AAD_LEN: usize = CHUNK_AAD_DOMAIN.len() + SNAPSHOT_ID_LEN + 8;

/// `"bubble-v1 chunk" || snapshot_id || u64 LE chunk_index`.
fn chunk_aad(snapshot_id: &[u8; SNAPSHOT_ID_LEN], chunk_index: u64) -> [u8; CHUNK_AAD_LEN] {
    let mut aad = [0u8; CHUNK_AAD_LEN];
    let (domain, rest) = aad.split_at_mut(CHUNK_AAD_DOMAIN.len());
    domain.copy_from_slice(CHUNK_AAD_DOMAIN);
    let (id, index) = rest.split_at_mut(SNAPSHOT_ID_LEN);
    id.copy_from_slice(snapshot_id);
    index.copy_from_slice(&chunk_index.to_le_bytes());
    aad
}

/// A chunk's nonce and tag, and the length of its body.
struct Framing {
    nonce: [u8; NONCE_LEN],
    tag: [u8; TAG_LEN],
    body_len: usize,
}

/// Reads the framing of `nonce || body || tag`.
fn framing(chunk: &[u8]) -> Result<Framing, Error> {
    let body_len = chunk
        .len()
        .checked_sub(CHUNK_OVERHEAD)
        .ok_or(Error::Truncated {
            what: "chunk",
            got: chunk.len(),
            need: CHUNK_OVERHEAD,
        })?;
    let (nonce_bytes, rest) = chunk.split_at(NONCE_LEN);
    let (_, tag_bytes) = rest.split_at(body_len);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(nonce_bytes);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(tag_bytes);
    Ok(Framing {
        nonce,
        tag,
        body_len,
    })
}

/// A data key prepared for one snapshot's chunks (the AES key schedule is
/// computed once): the one way to encrypt and decrypt chunks.
///
/// With the `std` feature the AEAD is ring's AES-256-GCM (several times
/// faster on the host; ring does not zeroize its key schedule when it is
/// dropped); without it, RustCrypto's `aes-gcm`, whose key schedule is
/// zeroized. Both produce the same, standard AES-256-GCM output.
pub struct ChunkCipher {
    key: FastKey,
    snapshot_id: [u8; SNAPSHOT_ID_LEN],
}

impl ChunkCipher {
    /// Prepares `dk` for the chunks of `snapshot_id`.
    pub fn new(dk: &DataKey, snapshot_id: &[u8; SNAPSHOT_ID_LEN]) -> Self {
        Self {
            key: FastKey::new(&dk.0),
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
        let tag = self.key.seal_in_place(&nonce, &aad, &mut out[NONCE_LEN..]);
        out.extend_from_slice(&tag);
        out
    }

    /// Encrypts one chunk with a nonce from the OS RNG (host only).
    #[cfg(feature = "std")]
    pub fn encrypt(&self, chunk_index: u64, plaintext: &[u8]) -> Vec<u8> {
        self.encrypt_with_rng(&mut rand_core::OsRng, chunk_index, plaintext)
    }

    /// Decrypts and authenticates one chunk into `out`, which must be
    /// exactly `chunk.len() - CHUNK_OVERHEAD` bytes (no allocation). Fails
    /// with [`Error::Truncated`] if the chunk is shorter than nonce + tag,
    /// and with [`Error::ChunkAuthentication`] if it was tampered with or
    /// belongs to another key, snapshot or index. On error `out` is left
    /// zeroed.
    pub fn decrypt_into(
        &self,
        chunk_index: u64,
        chunk: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        let res = self.decrypt_into_inner(chunk_index, chunk, out);
        if res.is_err() {
            out.fill(0);
        }
        res
    }

    fn decrypt_into_inner(
        &self,
        chunk_index: u64,
        chunk: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        let f = framing(chunk)?;
        if out.len() != f.body_len {
            return Err(Error::InvalidLength {
                what: "chunk output buffer",
                got: out.len(),
                expected: f.body_len,
            });
        }
        out.copy_from_slice(&chunk[NONCE_LEN..NONCE_LEN + f.body_len]);
        self.open(chunk_index, &f, out)
    }

    /// Decrypts and authenticates one chunk in its own buffer (no second
    /// allocation): `chunk` (`nonce || ciphertext || tag`) becomes the
    /// plaintext, a secret. On error the buffer is zeroized and dropped.
    pub fn decrypt_owned(&self, chunk_index: u64, chunk: Vec<u8>) -> Result<SecretBytes, Error> {
        let mut buf = SecretBytes::new(chunk);
        let f = framing(buf.expose())?;
        let b = buf.expose_mut();
        self.open(chunk_index, &f, &mut b[NONCE_LEN..NONCE_LEN + f.body_len])?;
        b.copy_within(NONCE_LEN..NONCE_LEN + f.body_len, 0);
        buf.truncate(f.body_len);
        Ok(buf)
    }

    /// Decrypts and authenticates one chunk; the plaintext is a secret.
    pub fn decrypt(&self, chunk_index: u64, chunk: &[u8]) -> Result<SecretBytes, Error> {
        let len = chunk.len().saturating_sub(CHUNK_OVERHEAD);
        let mut out = SecretBytes::new(alloc::vec![0u8; len]);
        self.decrypt_into(chunk_index, chunk, out.expose_mut())?;
        Ok(out)
    }

    /// Authenticates and decrypts `body` (a copy of the chunk's body) in
    /// place.
    fn open(&self, chunk_index: u64, f: &Framing, body: &mut [u8]) -> Result<(), Error> {
        let aad = chunk_aad(&self.snapshot_id, chunk_index);
        if self.key.open_in_place(&f.nonce, &aad, body, &f.tag) {
            Ok(())
        } else {
            Err(Error::ChunkAuthentication { index: chunk_index })
        }
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

#[cfg(test)]
mod tests {
    use super::super::TEST_SNAP as SNAP;
    use super::*;
    use crate::aead::ZeroizingKey;
    use crate::test_util::TestRng;
    use alloc::format;

    fn dk(seed: u64) -> DataKey {
        DataKey::generate(&mut TestRng::new(seed))
    }

    fn enc(rng: &mut TestRng, k: &DataKey, index: u64, pt: &[u8]) -> Vec<u8> {
        ChunkCipher::new(k, &SNAP).encrypt_with_rng(rng, index, pt)
    }

    fn dec(k: &DataKey, snap: &[u8; 16], index: u64, c: &[u8]) -> Result<SecretBytes, Error> {
        ChunkCipher::new(k, snap).decrypt(index, c)
    }

    #[test]
    fn chunk_round_trip_and_sizes() {
        let mut rng = TestRng::new(20);
        let k = dk(1);
        for len in [0usize, 1, 4095, 4096, 65_536] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let c = enc(&mut rng, &k, 5, &pt);
            assert_eq!(c.len(), len + CHUNK_OVERHEAD);
            if len >= 64 {
                assert!(!c.windows(64).any(|w| w == &pt[..64]));
            }
            let back = dec(&k, &SNAP, 5, &c).unwrap();
            assert_eq!(back.expose(), &pt[..]);
        }
    }

    #[test]
    fn nonces_are_random() {
        let mut rng = TestRng::new(21);
        let k = dk(1);
        let a = enc(&mut rng, &k, 0, b"same");
        let b = enc(&mut rng, &k, 0, b"same");
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_index_snapshot_or_key_is_rejected() {
        let mut rng = TestRng::new(22);
        let k = dk(1);
        let c = enc(&mut rng, &k, 7, b"page");
        assert_eq!(
            dec(&k, &SNAP, 8, &c).unwrap_err(),
            Error::ChunkAuthentication { index: 8 }
        );
        assert_eq!(
            dec(&k, &SNAP, u64::MAX, &c).unwrap_err(),
            Error::ChunkAuthentication { index: u64::MAX }
        );
        let mut other_snap = SNAP;
        other_snap[15] ^= 1;
        assert!(matches!(
            dec(&k, &other_snap, 7, &c),
            Err(Error::ChunkAuthentication { .. })
        ));
        assert!(matches!(
            dec(&dk(2), &SNAP, 7, &c),
            Err(Error::ChunkAuthentication { .. })
        ));
        // Two chunks swapped in the store.
        let c0 = enc(&mut rng, &k, 0, b"zero");
        let c1 = enc(&mut rng, &k, 1, b"one!");
        assert!(dec(&k, &SNAP, 0, &c1).is_err());
        assert!(dec(&k, &SNAP, 1, &c0).is_err());
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
        let c = enc(&mut rng, &k, 3, b"guest memory page bytes");
        for byte in 0..c.len() {
            for bit in 0..8 {
                let mut t = c.clone();
                t[byte] ^= 1 << bit;
                assert_eq!(
                    dec(&k, &SNAP, 3, &t).unwrap_err(),
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
        let c = enc(&mut rng, &k, 0, b"0123456789");
        for n in 0..c.len() {
            let err = dec(&k, &SNAP, 0, &c[..n]).unwrap_err();
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
        assert!(dec(&k, &SNAP, 0, &longer).is_err());
        // An empty-plaintext chunk is exactly the overhead and valid.
        let e = enc(&mut rng, &k, 1, b"");
        assert_eq!(e.len(), CHUNK_OVERHEAD);
        assert!(dec(&k, &SNAP, 1, &e).unwrap().is_empty());
    }

    #[test]
    fn decrypt_into_checks_lengths_and_zeroes_on_error() {
        let mut rng = TestRng::new(28);
        let k = dk(3);
        let cc = ChunkCipher::new(&k, &SNAP);
        let c = cc.encrypt_with_rng(&mut rng, 5, b"page five");
        let mut out = [0xffu8; 9];
        cc.decrypt_into(5, &c, &mut out).unwrap();
        assert_eq!(&out, b"page five");
        // Wrong index: error and a zeroed buffer.
        let mut out = [0xffu8; 9];
        assert_eq!(
            cc.decrypt_into(6, &c, &mut out).unwrap_err(),
            Error::ChunkAuthentication { index: 6 }
        );
        assert_eq!(out, [0u8; 9]);
        // Wrong output length.
        let mut small = [0xffu8; 8];
        assert!(matches!(
            cc.decrypt_into(5, &c, &mut small),
            Err(Error::InvalidLength { .. })
        ));
        assert_eq!(small, [0u8; 8]);
        // Truncated chunk.
        let mut out = [0xffu8; 4];
        assert!(matches!(
            cc.decrypt_into(5, &c[..CHUNK_OVERHEAD - 1], &mut out),
            Err(Error::Truncated { .. })
        ));
        assert_eq!(out, [0u8; 4]);
        let d = format!("{cc:?}");
        assert!(
            d.contains("REDACTED") && !d.contains(&hex::encode(*k.0)),
            "{d}"
        );
    }

    /// The chunk format is plain AES-256-GCM with the documented AAD: a
    /// chunk framed by hand with the zeroizing backend decrypts, and the
    /// chunk cipher's output opens there.
    #[test]
    fn chunk_format_is_documented_aes256gcm() {
        let mut rng = TestRng::new(29);
        let k = dk(4);
        let pt: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
        let mut aad = alloc::vec::Vec::new();
        aad.extend_from_slice(b"bubble-v1 chunk");
        aad.extend_from_slice(&SNAP);
        aad.extend_from_slice(&9u64.to_le_bytes());
        assert_eq!(aad[..], chunk_aad(&SNAP, 9)[..]);

        let c = enc(&mut rng, &k, 9, &pt);
        let nonce: [u8; NONCE_LEN] = c[..NONCE_LEN].try_into().unwrap();
        let tag: [u8; TAG_LEN] = c[c.len() - TAG_LEN..].try_into().unwrap();
        let mut body = c[NONCE_LEN..c.len() - TAG_LEN].to_vec();
        let z = ZeroizingKey::new(&k.0);
        assert!(z.open_in_place(&nonce, &aad, &mut body, &tag));
        assert_eq!(body, pt);

        let mut framed = nonce.to_vec();
        let mut ct = pt.clone();
        let tag = z.seal_in_place(&nonce, &aad, &mut ct);
        framed.extend_from_slice(&ct);
        framed.extend_from_slice(&tag);
        assert_eq!(framed, c);
        assert_eq!(dec(&k, &SNAP, 9, &framed).unwrap().expose(), &pt[..]);
    }
}
