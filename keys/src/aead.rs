//! AES-256-GCM, the AEAD of frozen bubbles (chunks and wrapped data keys),
//! behind one small in-place interface with two backends:
//!
//! - [`ZeroizingKey`]: RustCrypto's `aes-gcm`, whose key schedule is
//!   zeroized on drop; for key-encryption keys, and for everything
//!   without `std` (the guest);
//! - [`FastKey`]: with `std`, ring's AES-256-GCM (several times faster on
//!   the host; ring does not zeroize its key schedule on drop), for the
//!   bulk of a snapshot under its one-snapshot data key; without `std`,
//!   the zeroizing backend.
//!
//! Both produce the same, standard AES-256-GCM bytes. HPKE's AEADs are the
//! `hpke` crate's own (see [`crate::hpke`]).

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;

/// Length of an AES-256-GCM key.
pub(crate) const KEY_LEN: usize = 32;
/// Length of an AES-256-GCM nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Length of an AES-256-GCM tag.
pub(crate) const TAG_LEN: usize = 16;

/// A seal's tag; or, should the AEAD have refused (it cannot for these
/// sizes), a zero tag and `buf` wiped, so that the result never opens.
fn tag_or_wipe(tag: Option<&[u8]>, buf: &mut [u8]) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    match tag {
        Some(t) if t.len() == TAG_LEN => out.copy_from_slice(t),
        _ => buf.fill(0),
    }
    out
}

/// AES-256-GCM with a key schedule that is zeroized on drop.
pub(crate) struct ZeroizingKey(Aes256Gcm);

impl ZeroizingKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    /// Encrypts `buf` in place and returns the tag (see [`tag_or_wipe`]).
    pub(crate) fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let tag = self.0.encrypt_in_place_detached(nonce.into(), aad, buf);
        tag_or_wipe(tag.as_ref().ok().map(|t| t.as_slice()), buf)
    }

    /// Authenticates and decrypts `buf` in place; `false` if it fails
    /// (then `buf` holds no plaintext: the tag is checked first).
    pub(crate) fn open_in_place(
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

/// The bulk AES-256-GCM without `std`: the zeroizing backend.
#[cfg(not(feature = "std"))]
pub(crate) type FastKey = ZeroizingKey;

/// The bulk AES-256-GCM with `std`: ring's.
#[cfg(feature = "std")]
pub(crate) struct FastKey(Option<ring::aead::LessSafeKey>);

#[cfg(feature = "std")]
impl FastKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        // ring refuses only a key of the wrong length; ours is 32 bytes.
        // Should it ever refuse, every seal yields an unopenable result
        // and every open fails.
        Self(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
                .ok()
                .map(ring::aead::LessSafeKey::new),
        )
    }

    /// As [`ZeroizingKey::seal_in_place`].
    pub(crate) fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        use ring::aead::{Aad, Nonce};
        let tag = self.0.as_ref().and_then(|k| {
            k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
                .ok()
        });
        tag_or_wipe(tag.as_ref().map(|t| t.as_ref()), buf)
    }

    /// As [`ZeroizingKey::open_in_place`].
    pub(crate) fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> bool {
        use ring::aead::{Aad, Nonce, Tag};
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

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// The published GCM test case 14 (AES-256, all-zero key, nonce and one
    /// zero block), through both backends.
    #[test]
    fn aes256gcm_known_answer_on_both_backends() {
        let key = [0u8; KEY_LEN];
        let nonce = [0u8; NONCE_LEN];
        let mut a = [0u8; 16];
        let tag_a = ZeroizingKey::new(&key).seal_in_place(&nonce, b"", &mut a);
        let mut b = [0u8; 16];
        let tag_b = FastKey::new(&key).seal_in_place(&nonce, b"", &mut b);
        for (ct, tag) in [(a, tag_a), (b, tag_b)] {
            assert_eq!(hex::encode(ct), "cea7403d4d606b6e074ec5d3baf39d18");
            assert_eq!(hex::encode(tag), "d0d1c8a799996bf0265b98b5d48ab919");
        }
    }

    /// Each backend opens what the other sealed, and refuses a changed tag,
    /// AAD or body.
    #[test]
    fn backends_interoperate_and_authenticate() {
        let key = [7u8; KEY_LEN];
        let nonce = [9u8; NONCE_LEN];
        let pt: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
        let z = ZeroizingKey::new(&key);
        let f = FastKey::new(&key);

        let mut by_z = pt.clone();
        let tag_z = z.seal_in_place(&nonce, b"aad", &mut by_z);
        let mut by_f = pt.clone();
        let tag_f = f.seal_in_place(&nonce, b"aad", &mut by_f);
        assert_eq!((&by_z, tag_z), (&by_f, tag_f));
        assert_ne!(by_z, pt);

        let mut buf = by_z.clone();
        assert!(f.open_in_place(&nonce, b"aad", &mut buf, &tag_z));
        assert_eq!(buf, pt);
        let mut buf = by_f.clone();
        assert!(z.open_in_place(&nonce, b"aad", &mut buf, &tag_f));
        assert_eq!(buf, pt);

        let mut bad_tag = tag_z;
        bad_tag[0] ^= 1;
        let mut body = by_z.clone();
        body[100] ^= 1;
        let cases: [(&[u8], Vec<u8>, [u8; TAG_LEN]); 3] = [
            (b"aad", by_z.clone(), bad_tag),
            (b"aaD", by_z.clone(), tag_z),
            (b"aad", body, tag_z),
        ];
        for (aad, ct, tag) in cases {
            let mut buf = ct.clone();
            assert!(!z.open_in_place(&nonce, aad, &mut buf, &tag));
            let mut buf = ct;
            assert!(!f.open_in_place(&nonce, aad, &mut buf, &tag));
        }
    }
}
