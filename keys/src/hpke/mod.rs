//! HPKE (RFC 9180), base mode, single shot: DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, and AES-256-GCM (default), AES-128-GCM or
//! ChaCha20-Poly1305.
//!
//! A parent seals a credential to the bubble's X25519 key with
//! [`seal_credential`], using `info` = [`INFO_CREDENTIAL`] and
//! `aad` = [`credential_aad`]`(bubble_id, name, portions_digest,
//! policy_digest)`; the broker relays the [`SealedBox`] wire bytes; the
//! bubble opens it with [`open_credential`]. A call's input is sealed the
//! same way with `info` = [`INFO_SEALED_INPUT`] and `aad` =
//! [`sealed_input_aad`]`(bubble_id, portion, function, seq)`.
//!
//! The HPKE itself is the `hpke` crate (rust-hpke), built without `std`,
//! `getrandom` or its post-quantum KEMs, so the bare-metal guest uses the
//! same code as the host. This module adds the [`SealedBox`] wire format,
//! the choice of AEAD at run time, zeroizing buffers around the plaintext,
//! and this crate's error type. It is checked against the official test
//! vectors (RFC 9180 Appendix A.1 and A.2, and the CFRG vector for
//! AES-256-GCM).
//!
//! # `SealedBox` wire format (version 1)
//! ```text
//! offset 0    u8       version = 1
//! offset 1    u16 BE   HPKE AEAD id (0x0001 AES-128-GCM, 0x0002 AES-256-GCM,
//!                      0x0003 ChaCha20-Poly1305)
//! offset 3    [u8;32]  enc (the sender's ephemeral X25519 public key)
//! offset 35   ...      AEAD ciphertext || 16-byte tag (at least 16 bytes)
//! ```

mod rng;
mod sealed_box;

pub use sealed_box::{SealedBox, SEALED_BOX_HEADER_LEN, SEALED_BOX_MIN_LEN, SEALED_BOX_VERSION};

use crate::error::Error;
use crate::fmt_util::{push_len_prefixed, Hex};
use crate::secret::SecretBytes;
use alloc::vec::Vec;
use core::fmt;
use hpke::aead::{Aead, AeadTag, AesGcm128, AesGcm256, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, HpkeError, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::{CryptoRng, RngCore};
use rng::Rng010;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// HPKE `info` for credentials sealed to a bubble.
pub const INFO_CREDENTIAL: &[u8] = b"bubble-v1 credential";

/// Length of an X25519 public key, and of HPKE's `enc` for this KEM.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Length of every AEAD tag of the suites here.
pub(crate) const TAG_LEN: usize = 16;

/// The KEM: DHKEM(X25519, HKDF-SHA256).
type Kem = X25519HkdfSha256;
/// The KEM's private key (zeroized on drop by the `hpke` crate).
type PrivateKey = <Kem as hpke::Kem>::PrivateKey;
/// The KEM's public key.
type PublicKey = <Kem as hpke::Kem>::PublicKey;
/// The KEM's encapsulated key (`enc`).
type EncappedKey = <Kem as hpke::Kem>::EncappedKey;

/// Calls generic function `f::<A>(args)` with the `hpke` crate's AEAD type
/// `A` for a run-time [`AeadId`].
macro_rules! with_aead {
    ($id:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $id {
            AeadId::Aes128Gcm => $f::<AesGcm128>($($arg),*),
            AeadId::Aes256Gcm => $f::<AesGcm256>($($arg),*),
            AeadId::ChaCha20Poly1305 => $f::<ChaCha20Poly1305>($($arg),*),
        }
    };
}

/// The AEADs of RFC 9180 this crate implements (values are the HPKE ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum AeadId {
    /// AES-128-GCM (HPKE id 0x0001).
    Aes128Gcm = 0x0001,
    /// AES-256-GCM (HPKE id 0x0002), the default.
    Aes256Gcm = 0x0002,
    /// ChaCha20-Poly1305 (HPKE id 0x0003).
    ChaCha20Poly1305 = 0x0003,
}

impl AeadId {
    /// Every AEAD, in id order.
    pub const ALL: [Self; 3] = [Self::Aes128Gcm, Self::Aes256Gcm, Self::ChaCha20Poly1305];

    /// The RFC 9180 AEAD id.
    pub fn id(self) -> u16 {
        self as u16
    }

    /// Parses an RFC 9180 AEAD id.
    pub fn from_id(id: u16) -> Result<Self, Error> {
        match id {
            0x0001 => Ok(Self::Aes128Gcm),
            0x0002 => Ok(Self::Aes256Gcm),
            0x0003 => Ok(Self::ChaCha20Poly1305),
            other => Err(Error::UnsupportedAead(other)),
        }
    }

    /// Key length `Nk` in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm | Self::ChaCha20Poly1305 => 32,
        }
    }
}

/// An X25519 key pair for HPKE (the bubble's credential key, or a parent's
/// result key). The secret is zeroized on drop and never printed.
pub struct KemKeyPair {
    secret: PrivateKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl KemKeyPair {
    fn from_parts(secret: PrivateKey, public: &PublicKey) -> Self {
        let mut pk = [0u8; PUBLIC_KEY_LEN];
        public.write_exact(&mut pk);
        Self { secret, public: pk }
    }

    /// Generates a key pair: the private key is 32 bytes from `rng`,
    /// clamped as RFC 7748 says (`DeserializePrivateKey`, RFC 9180
    /// §7.1.2), the public key computed once from it. RFC 9180 allows any
    /// uniformly random private key; its `GenerateKeyPair` through
    /// `DeriveKeyPair` (HKDF over the random bytes) adds nothing to a key
    /// already drawn from a CSPRNG and costs the guest's start-up time.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut sk = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut sk[..]);
        match Self::from_secret_bytes(&sk) {
            Ok(k) => k,
            // Unreachable (any 32 bytes are an X25519 private key once
            // clamped); if it ever were, the derived path still gives a
            // fresh key.
            Err(_) => {
                let (secret, public) = Kem::gen_keypair_with_rng(&mut Rng010(rng));
                Self::from_parts(secret, &public)
            }
        }
    }

    /// RFC 9180 `DeriveKeyPair(ikm)`: a deterministic key pair from at least
    /// 32 bytes of secret input keying material.
    pub fn derive(ikm: &[u8]) -> Result<Self, Error> {
        if ikm.len() < 32 {
            return Err(Error::InvalidLength {
                what: "KEM ikm",
                got: ikm.len(),
                expected: 32,
            });
        }
        let (secret, public) = Kem::derive_keypair(ikm);
        Ok(Self::from_parts(secret, &public))
    }

    /// Rebuilds a key pair from its serialized 32-byte private key (clamped
    /// as RFC 9180 §7.1.2 requires).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Result<Self, Error> {
        let secret = PrivateKey::from_bytes(secret).map_err(|_| Error::InvalidLength {
            what: "X25519 private key",
            got: secret.len(),
            expected: 32,
        })?;
        let public = Kem::sk_to_pk(&secret);
        Ok(Self::from_parts(secret, &public))
    }

    /// The serialized (clamped) private key; handle with care, zeroized on
    /// drop.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        self.secret.write_exact(&mut out[..]);
        out
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }
}

impl ZeroizeOnDrop for KemKeyPair {}

impl fmt::Debug for KemKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KemKeyPair")
            .field("public", &Hex(&self.public))
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// HPKE `info` for a call's input sealed to a bubble.
pub const INFO_SEALED_INPUT: &[u8] = b"bubble-v1 sealed input";

/// The AAD binding a credential to its bubble, its name and the code set
/// the custodian verified, unambiguously:
/// `u64 LE len(bubble_id) || bubble_id || u64 LE len(name) || name ||
/// portions_digest (48) || policy_digest (32)`.
///
/// The digests are the ones a verified attestation report binds; the
/// bubble opens with its current ones, so a credential sealed for one set
/// of portions and one policy opens for no other.
pub fn credential_aad(
    bubble_id: &str,
    name: &str,
    portions_digest: &[u8; 48],
    policy_digest: &[u8; 32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + bubble_id.len() + name.len() + 80);
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    push_len_prefixed(&mut out, name.as_bytes());
    out.extend_from_slice(portions_digest);
    out.extend_from_slice(policy_digest);
    out
}

/// The AAD of a sealed call input, unambiguously:
/// `u64 LE len(bubble_id) || bubble_id || u64 LE len(portion) || portion ||
/// u64 LE len(function) || function || u64 LE seq`, where `seq` is the
/// call's nonce (the bubble refuses one it has seen).
pub fn sealed_input_aad(bubble_id: &str, portion: &str, function: &str, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + bubble_id.len() + portion.len() + function.len());
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    push_len_prefixed(&mut out, portion.as_bytes());
    push_len_prefixed(&mut out, function.as_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out
}

/// Seals `plaintext` to `recipient_pk` with AES-256-GCM (RFC 9180 base
/// mode, single shot). Fails only for a low-order recipient key.
pub fn seal_credential<R: RngCore + CryptoRng>(
    rng: &mut R,
    recipient_pk: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<SealedBox, Error> {
    seal_credential_with(AeadId::Aes256Gcm, rng, recipient_pk, info, aad, plaintext)
}

/// Like [`seal_credential`], with a chosen AEAD.
pub fn seal_credential_with<R: RngCore + CryptoRng>(
    aead: AeadId,
    rng: &mut R,
    recipient_pk: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<SealedBox, Error> {
    let pk = PublicKey::from_bytes(recipient_pk).map_err(|_| Error::InvalidPublicKey)?;
    let mut rng = Rng010(rng);
    let (enc, ciphertext) = with_aead!(aead, seal(&mut rng, &pk, info, aad, plaintext))?;
    Ok(SealedBox {
        aead,
        enc,
        ciphertext,
    })
}

/// Opens a [`SealedBox`] with the recipient's key pair; `info` and `aad`
/// must equal the sender's. The plaintext comes back as [`SecretBytes`].
pub fn open_credential(
    recipient: &KemKeyPair,
    sealed: &SealedBox,
    info: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, Error> {
    let body_len = sealed
        .ciphertext
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(Error::Truncated {
            what: "sealed box ciphertext",
            got: sealed.ciphertext.len(),
            need: TAG_LEN,
        })?;
    let (body, tag) = sealed.ciphertext.split_at(body_len);
    let enc = EncappedKey::from_bytes(&sealed.enc).map_err(|_| Error::InvalidPublicKey)?;
    let sk = &recipient.secret;
    with_aead!(sealed.aead, open(sk, &enc, info, aad, body, tag))
}

/// Maps the `hpke` crate's errors: a failed DH (low-order peer key) is
/// [`Error::InvalidPublicKey`], everything else a failed seal or open.
fn map_hpke_error(e: HpkeError) -> Error {
    match e {
        HpkeError::EncapError | HpkeError::DecapError => Error::InvalidPublicKey,
        _ => Error::OpenFailed,
    }
}

/// Single-shot seal with AEAD `A`: returns `(enc, ciphertext || tag)`. The
/// plaintext is copied once, into the buffer encrypted in place, which is
/// zeroized should sealing fail half-way.
fn seal<A: Aead>(
    rng: &mut impl hpke::rand_core::CryptoRng,
    pk: &PublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; PUBLIC_KEY_LEN], Vec<u8>), Error> {
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    let sealed = hpke::single_shot_seal_inout_detached_with_rng::<A, HkdfSha256, Kem>(
        &OpModeS::Base,
        pk,
        info,
        buf.as_mut_slice().into(),
        aad,
        rng,
    );
    let (encapped, tag) = match sealed {
        Ok(v) => v,
        Err(e) => {
            buf.zeroize();
            return Err(map_hpke_error(e));
        }
    };
    buf.extend_from_slice(&tag.to_bytes());
    let mut enc = [0u8; PUBLIC_KEY_LEN];
    encapped.write_exact(&mut enc);
    Ok((enc, buf))
}

/// Single-shot open with AEAD `A`, decrypting in place inside a
/// [`SecretBytes`] (no unzeroized copy of the plaintext exists).
fn open<A: Aead>(
    sk: &PrivateKey,
    enc: &EncappedKey,
    info: &[u8],
    aad: &[u8],
    body: &[u8],
    tag: &[u8],
) -> Result<SecretBytes, Error> {
    let tag = AeadTag::<A>::from_bytes(tag).map_err(|_| Error::OpenFailed)?;
    let mut out = SecretBytes::from_slice(body);
    hpke::single_shot_open_inout_detached::<A, HkdfSha256, Kem>(
        &OpModeR::Base,
        sk,
        enc,
        info,
        out.expose_mut().into(),
        aad,
        &tag,
    )
    .map_err(map_hpke_error)?;
    Ok(out)
}

// After `with_aead!`, which the tests use too.
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;
