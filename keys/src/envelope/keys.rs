//! The two keys of a frozen bubble: the per-snapshot [`DataKey`] and the
//! [`Kek`] that wraps it.

use crate::aead::KEY_LEN;
use crate::error::Error;
use core::fmt;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// 32 fresh random key bytes.
fn random_key<R: RngCore + CryptoRng>(rng: &mut R) -> Zeroizing<[u8; KEY_LEN]> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill_bytes(&mut k[..]);
    k
}

/// Moves key bytes into a zeroizing box and wipes the caller's copy.
fn key_from_bytes(mut bytes: [u8; KEY_LEN]) -> Zeroizing<[u8; KEY_LEN]> {
    let k = Zeroizing::new(bytes);
    bytes.zeroize();
    k
}

/// A per-snapshot 256-bit data key; zeroized on drop, never printed.
#[derive(Clone)]
pub struct DataKey(pub(super) Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// Generates a fresh random data key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(random_key(rng))
    }

    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(key_from_bytes(bytes))
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
pub struct Kek(pub(super) Zeroizing<[u8; KEY_LEN]>);

impl Kek {
    /// Generates a fresh random KEK.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(random_key(rng))
    }

    /// A KEK from 32 bytes (e.g. supplied by the parent).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(key_from_bytes(bytes))
    }

    /// A KEK from a parent-supplied slice, which must be exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != KEY_LEN {
            return Err(Error::InvalidLength {
                what: "KEK",
                got: bytes.len(),
                expected: KEY_LEN,
            });
        }
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(bytes);
        Ok(Self(k))
    }

    /// A key for another purpose derived from this KEK, one per `label`
    /// (e.g. authenticating objects that brokers sharing this KEK write to
    /// their shared store): SHA-256("bubble-v1 derived key" || u64 LE
    /// len(label) || label || kek). The KEK is uniformly random, so the
    /// hash is a sound derivation; distinct labels give independent keys.
    pub fn derive(&self, label: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
        let mut h = Sha256::new();
        h.update(b"bubble-v1 derived key");
        h.update((label.len() as u64).to_le_bytes());
        h.update(label);
        h.update(&self.0[..]);
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&h.finalize());
        k
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

#[cfg(test)]
mod tests {
    use super::super::{unwrap_key, wrap_key_with_rng, TEST_SNAP as SNAP};
    use super::*;
    use crate::test_util::TestRng;
    use alloc::format;
    use alloc::vec;

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
    fn generated_keys_differ() {
        let mut rng = TestRng::new(30);
        let (a, b) = (Kek::generate(&mut rng), Kek::generate(&mut rng));
        assert_ne!(*a.0, *b.0);
        let (c, d) = (DataKey::generate(&mut rng), DataKey::generate(&mut rng));
        assert_ne!(*c.0, *d.0);
        assert_ne!(*c.0, [0u8; 32]);
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
}
