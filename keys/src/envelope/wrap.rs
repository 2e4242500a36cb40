//! Wrapping a snapshot's [`DataKey`] under a [`Kek`].

use super::{DataKey, Kek, SNAPSHOT_ID_LEN, WRAPPED_KEY_LEN, WRAPPED_KEY_VERSION, WRAP_AAD_DOMAIN};
use crate::aead::{ZeroizingKey, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// Length of a wrapped key's AAD.
const WRAP_AAD_LEN: usize = WRAP_AAD_DOMAIN.len() + 1 + SNAPSHOT_ID_LEN;

/// Where the encrypted key starts in a wrapped key.
const CT_AT: usize = 1 + NONCE_LEN;
/// Where the tag starts in a wrapped key.
const TAG_AT: usize = CT_AT + KEY_LEN;

/// `"bubble-v1 key wrap" || version || snapshot_id`.
fn wrap_aad(snapshot_id: &[u8; SNAPSHOT_ID_LEN]) -> [u8; WRAP_AAD_LEN] {
    let mut aad = [0u8; WRAP_AAD_LEN];
    let (domain, rest) = aad.split_at_mut(WRAP_AAD_DOMAIN.len());
    domain.copy_from_slice(WRAP_AAD_DOMAIN);
    rest[0] = WRAPPED_KEY_VERSION;
    rest[1..].copy_from_slice(snapshot_id);
    aad
}

/// Wraps `dk` under `kek` for `snapshot_id` with a nonce drawn from `rng`.
/// The KEK's AES key schedule is zeroized after use.
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
    out[1..CT_AT].copy_from_slice(&nonce);
    let (body, tag) = out[CT_AT..].split_at_mut(KEY_LEN);
    body.copy_from_slice(&dk.0[..]);
    let t = ZeroizingKey::new(&kek.0).seal_in_place(&nonce, &wrap_aad(snapshot_id), body);
    tag.copy_from_slice(&t);
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

/// Unwraps a data key wrapped by [`wrap_key_with_rng`] for `snapshot_id`.
pub fn unwrap_key(
    kek: &Kek,
    wrapped: &[u8],
    snapshot_id: &[u8; SNAPSHOT_ID_LEN],
) -> Result<DataKey, Error> {
    let wrapped: &[u8; WRAPPED_KEY_LEN] = wrapped.try_into().map_err(|_| Error::InvalidLength {
        what: "wrapped key",
        got: wrapped.len(),
        expected: WRAPPED_KEY_LEN,
    })?;
    if wrapped[0] != WRAPPED_KEY_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "wrapped key",
            version: wrapped[0],
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&wrapped[1..CT_AT]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&wrapped[TAG_AT..]);
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    k.copy_from_slice(&wrapped[CT_AT..TAG_AT]);
    if ZeroizingKey::new(&kek.0).open_in_place(&nonce, &wrap_aad(snapshot_id), &mut k[..], &tag) {
        Ok(DataKey(k))
    } else {
        Err(Error::UnwrapFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::TEST_SNAP as SNAP;
    use super::*;
    use crate::envelope::ChunkCipher;
    use crate::test_util::TestRng;
    use alloc::vec;

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
        let c = ChunkCipher::new(&k, &SNAP).encrypt_with_rng(&mut rng, 0, b"x");
        let opened = ChunkCipher::new(&back, &SNAP).decrypt(0, &c).unwrap();
        assert_eq!(opened.expose(), b"x");

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

    /// The wrapped-key layout and AAD are the documented ones (the frozen
    /// format must not change): AES-256-GCM of the key under the KEK.
    #[test]
    fn wrapped_key_layout_is_the_documented_one() {
        let kek = Kek::from_bytes([1u8; 32]);
        let k = DataKey::from_bytes([2u8; 32]);
        let w = wrap_key_with_rng(&mut TestRng::new(31), &kek, &k, &SNAP);
        let mut aad = vec![];
        aad.extend_from_slice(b"bubble-v1 key wrap");
        aad.push(1);
        aad.extend_from_slice(&SNAP);
        assert_eq!(aad[..], wrap_aad(&SNAP)[..]);
        let nonce: [u8; NONCE_LEN] = w[1..13].try_into().unwrap();
        let tag: [u8; TAG_LEN] = w[45..61].try_into().unwrap();
        let mut body = w[13..45].to_vec();
        assert!(ZeroizingKey::new(&[1u8; 32]).open_in_place(&nonce, &aad, &mut body, &tag));
        assert_eq!(body, [2u8; 32]);
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
}
