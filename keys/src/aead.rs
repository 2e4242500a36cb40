//! The AEADs this crate uses, behind one small interface.

use crate::hpke::AeadId;
use crate::secret::SecretBytes;
use aes_gcm::aead::consts::{U12, U16};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use alloc::vec::Vec;
use chacha20poly1305::ChaCha20Poly1305;

/// Length of every AEAD nonce used here.
pub(crate) const NONCE_LEN: usize = 12;
/// Length of every AEAD tag used here.
pub(crate) const TAG_LEN: usize = 16;

/// Why an AEAD operation failed (mapped to a public error by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AeadFailure {
    /// The key has the wrong length for the algorithm.
    KeyLength,
    /// The ciphertext is shorter than a tag.
    Truncated,
    /// Authentication failed.
    Auth,
}

fn seal_in_place<A: AeadInPlace<NonceSize = U12, TagSize = U16> + KeyInit>(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), AeadFailure> {
    let cipher = A::new_from_slice(key).map_err(|_| AeadFailure::KeyLength)?;
    let tag = cipher
        .encrypt_in_place_detached(nonce.into(), aad, buf.as_mut_slice())
        .map_err(|_| AeadFailure::Auth)?;
    buf.extend_from_slice(&tag);
    Ok(())
}

fn open_in_place<A: AeadInPlace<NonceSize = U12, TagSize = U16> + KeyInit>(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    body: &mut [u8],
    tag: &[u8],
) -> Result<(), AeadFailure> {
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| AeadFailure::Truncated)?;
    let cipher = A::new_from_slice(key).map_err(|_| AeadFailure::KeyLength)?;
    cipher
        .decrypt_in_place_detached(nonce.into(), aad, body, tag.into())
        .map_err(|_| AeadFailure::Auth)
}

/// Encrypts `plaintext`; returns `ciphertext || tag`.
pub(crate) fn seal(
    aead: AeadId,
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, AeadFailure> {
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    let res = match aead {
        AeadId::Aes128Gcm => seal_in_place::<Aes128Gcm>(key, nonce, aad, &mut buf),
        AeadId::Aes256Gcm => seal_in_place::<Aes256Gcm>(key, nonce, aad, &mut buf),
        AeadId::ChaCha20Poly1305 => seal_in_place::<ChaCha20Poly1305>(key, nonce, aad, &mut buf),
    };
    if let Err(e) = res {
        // The buffer may still hold plaintext.
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(e);
    }
    Ok(buf)
}

/// Decrypts `ciphertext || tag`; the plaintext is returned as a secret.
pub(crate) fn open(
    aead: AeadId,
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, AeadFailure> {
    let body_len = ciphertext
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(AeadFailure::Truncated)?;
    let (body, tag) = ciphertext.split_at(body_len);
    let mut out = SecretBytes::from_slice(body);
    let buf = out.expose_mut();
    match aead {
        AeadId::Aes128Gcm => open_in_place::<Aes128Gcm>(key, nonce, aad, buf, tag)?,
        AeadId::Aes256Gcm => open_in_place::<Aes256Gcm>(key, nonce, aad, buf, tag)?,
        AeadId::ChaCha20Poly1305 => open_in_place::<ChaCha20Poly1305>(key, nonce, aad, buf, tag)?,
    }
    Ok(out)
}
