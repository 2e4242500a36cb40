//! Sealed sessions: one HPKE setup per (parent handle, bubble), then one
//! AES-256-GCM open per call.
//!
//! The parent draws a random 32-byte session key and seals it to the
//! bubble's attested KEM key ([`crate::seal_credential`] with `info` =
//! [`INFO_SESSION`] and `aad` = [`session_aad`], which binds the bubble id,
//! that KEM key, the portions and policy digests the parent verified and
//! the session id). The bubble opens it once with its current digests, so
//! a setup made for other code opens for none. Each call's input is then
//! AES-256-GCM under the session key with nonce [`session_nonce`]`(seq)`
//! and AAD [`session_call_aad`] (bubble id, portion, function, session id,
//! seq); the bubble refuses a `seq` it has seen in that session, so a
//! nonce never repeats under one key.

use alloc::vec::Vec;
use core::fmt;

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::aead::{ZeroizingKey, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use crate::fmt_util::push_len_prefixed;
use crate::hpke::{open_credential, seal_credential, KemKeyPair, SealedBox};
use crate::secret::SecretBytes;

/// HPKE `info` of a session setup.
pub const INFO_SESSION: &[u8] = b"bubble-v1 session";

/// The AAD of a session setup, unambiguously:
/// `u64 LE len(bubble_id) || bubble_id || kem_pk (32) || portions_digest
/// (48) || policy_digest (32) || u64 LE session_id`.
pub fn session_aad(
    bubble_id: &str,
    kem_pk: &[u8; 32],
    portions_digest: &[u8; 48],
    policy_digest: &[u8; 32],
    session_id: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bubble_id.len() + 32 + 48 + 32 + 8);
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    out.extend_from_slice(kem_pk);
    out.extend_from_slice(portions_digest);
    out.extend_from_slice(policy_digest);
    out.extend_from_slice(&session_id.to_le_bytes());
    out
}

/// The AAD of one session call, unambiguously:
/// `u64 LE len(bubble_id) || bubble_id || u64 LE len(portion) || portion ||
/// u64 LE len(function) || function || u64 LE session_id || u64 LE seq`.
pub fn session_call_aad(
    bubble_id: &str,
    portion: &str,
    function: &str,
    session_id: u64,
    seq: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + bubble_id.len() + portion.len() + function.len());
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    push_len_prefixed(&mut out, portion.as_bytes());
    push_len_prefixed(&mut out, function.as_bytes());
    out.extend_from_slice(&session_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out
}

/// The AES-GCM nonce of call `seq`: four zero bytes, then `seq` big endian.
/// Distinct for distinct `seq`, and the bubble accepts each `seq` once per
/// session.
pub fn session_nonce(seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// A session's AES-256-GCM key (its key schedule zeroized on drop, never
/// printed).
pub struct SessionKey(ZeroizingKey);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey([REDACTED])")
    }
}

impl SessionKey {
    /// Parent side: draws a session key and seals it to `kem_pk` with
    /// `aad` ([`session_aad`]); returns the key and the setup to send.
    pub fn generate_sealed<R: RngCore + CryptoRng>(
        rng: &mut R,
        kem_pk: &[u8; 32],
        aad: &[u8],
    ) -> Result<(Self, SealedBox), Error> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(&mut key[..]);
        Self::seal_key(rng, kem_pk, aad, &key)
    }

    /// Parent side: like [`SessionKey::generate_sealed`] with a key the
    /// caller drew (zeroize it after).
    pub fn seal_key<R: RngCore + CryptoRng>(
        rng: &mut R,
        kem_pk: &[u8; 32],
        aad: &[u8],
        key: &[u8; KEY_LEN],
    ) -> Result<(Self, SealedBox), Error> {
        let setup = seal_credential(rng, kem_pk, INFO_SESSION, aad, &key[..])?;
        Ok((Self(ZeroizingKey::new(key)), setup))
    }

    /// Bubble side: opens a setup with the bubble's KEM key pair and the
    /// AAD it expects; anything but a 32-byte key is refused.
    pub fn open_setup(kem: &KemKeyPair, setup: &SealedBox, aad: &[u8]) -> Result<Self, Error> {
        let key = open_credential(kem, setup, INFO_SESSION, aad)?;
        let key: &[u8; KEY_LEN] = key.expose().try_into().map_err(|_| Error::InvalidLength {
            what: "session key",
            got: key.len(),
            expected: KEY_LEN,
        })?;
        Ok(Self(ZeroizingKey::new(key)))
    }

    /// Encrypts call `seq`'s input: `ciphertext || tag`.
    pub fn seal(&self, seq: u64, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        let tag = self.0.seal_in_place(&session_nonce(seq), aad, &mut buf);
        buf.extend_from_slice(&tag);
        buf
    }

    /// Authenticates and decrypts call `seq`'s `ciphertext || tag`; the
    /// plaintext comes back as [`SecretBytes`].
    pub fn open(&self, seq: u64, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, Error> {
        let body_len = sealed.len().checked_sub(TAG_LEN).ok_or(Error::Truncated {
            what: "session ciphertext",
            got: sealed.len(),
            need: TAG_LEN,
        })?;
        let (body, tag) = sealed.split_at(body_len);
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| Error::OpenFailed)?;
        let mut out = SecretBytes::from_slice(body);
        if !self
            .0
            .open_in_place(&session_nonce(seq), aad, out.expose_mut(), tag)
        {
            return Err(Error::OpenFailed);
        }
        Ok(out)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use std::{format, vec};

    #[test]
    fn a_session_opens_only_for_its_binding_and_each_call_for_its_own() {
        let kem = KemKeyPair::generate(&mut OsRng);
        let other = KemKeyPair::generate(&mut OsRng);
        let (p, q) = ([1u8; 48], [2u8; 32]);
        let aad = session_aad("bub-1", &kem.public_key(), &p, &q, 7);
        let (k, setup) = SessionKey::generate_sealed(&mut OsRng, &kem.public_key(), &aad).unwrap();
        let g = SessionKey::open_setup(&kem, &setup, &aad).unwrap();
        // Another bubble's key, id, code, policy or session id: refused.
        assert!(SessionKey::open_setup(&other, &setup, &aad).is_err());
        for bad in [
            session_aad("bub-2", &kem.public_key(), &p, &q, 7),
            session_aad("bub-1", &other.public_key(), &p, &q, 7),
            session_aad("bub-1", &kem.public_key(), &[9; 48], &q, 7),
            session_aad("bub-1", &kem.public_key(), &p, &[9; 32], 7),
            session_aad("bub-1", &kem.public_key(), &p, &q, 8),
        ] {
            assert!(SessionKey::open_setup(&kem, &setup, &bad).is_err());
        }
        let a = session_call_aad("bub-1", "payments", "tokenize", 7, 3);
        let ct = k.seal(3, &a, b"4111111111111111");
        assert_eq!(g.open(3, &a, &ct).unwrap().expose(), b"4111111111111111");
        assert!(g.open(4, &a, &ct).is_err());
        for bad in [
            session_call_aad("bub-2", "payments", "tokenize", 7, 3),
            session_call_aad("bub-1", "other", "tokenize", 7, 3),
            session_call_aad("bub-1", "payments", "charge", 7, 3),
            session_call_aad("bub-1", "payments", "tokenize", 8, 3),
            session_call_aad("bub-1", "payments", "tokenize", 7, 4),
        ] {
            assert!(g.open(3, &bad, &ct).is_err());
        }
        for n in 0..ct.len() {
            assert!(g.open(3, &a, &ct[..n]).is_err());
        }
        let mut flipped = ct.clone();
        flipped[0] ^= 1;
        assert!(g.open(3, &a, &flipped).is_err());
        assert_eq!(format!("{g:?}"), "SessionKey([REDACTED])");
    }

    #[test]
    fn a_setup_holding_anything_but_a_32_byte_key_is_refused() {
        let kem = KemKeyPair::generate(&mut OsRng);
        let aad = session_aad("b", &kem.public_key(), &[0; 48], &[0; 32], 1);
        for len in [0usize, 16, 31, 33, 64] {
            let s = seal_credential(
                &mut OsRng,
                &kem.public_key(),
                INFO_SESSION,
                &aad,
                &vec![1; len],
            )
            .unwrap();
            assert!(SessionKey::open_setup(&kem, &s, &aad).is_err(), "{len}");
        }
    }
}
