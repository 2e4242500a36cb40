//! HPKE (RFC 9180), base mode, single shot: DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, and AES-256-GCM (default), AES-128-GCM or
//! ChaCha20-Poly1305.
//!
//! A parent seals a credential to the bubble's X25519 key with
//! [`seal_credential`], using `info` = [`INFO_CREDENTIAL`] and
//! `aad` = [`credential_aad`]`(bubble_id, name)`; the broker relays the
//! [`SealedBox`] wire bytes; the bubble opens it with [`open_credential`].
//!
//! The implementation follows RFC 9180 §4 (DHKEM, `DeriveKeyPair`), §5.1
//! (key schedule) and §5.2 (sequence number 0), and is checked against the
//! official test vectors (RFC 9180 Appendix A.1 and A.2, and the CFRG vector
//! for AES-256-GCM). It is written here, not taken from the `hpke` crate,
//! because every `hpke` release for rand_core 0.6 pulls `aes-gcm` with its
//! default features (getrandom), which the bare-metal guest cannot have.
//!
//! # `SealedBox` wire format (version 1)
//! ```text
//! offset 0    u8       version = 1
//! offset 1    u16 BE   HPKE AEAD id (0x0001 AES-128-GCM, 0x0002 AES-256-GCM,
//!                      0x0003 ChaCha20-Poly1305)
//! offset 3    [u8;32]  enc (the sender's ephemeral X25519 public key)
//! offset 35   ...      AEAD ciphertext || 16-byte tag (at least 16 bytes)
//! ```

use crate::aead::{self, AeadFailure, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use crate::fmt_util::Hex;
use crate::secret::SecretBytes;
use alloc::vec::Vec;
use core::fmt;
use hkdf::{Hkdf, HkdfExtract};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// HPKE `info` for credentials sealed to a bubble.
pub const INFO_CREDENTIAL: &[u8] = b"bubble-v1 credential";

/// Version byte of the [`SealedBox`] wire format.
pub const SEALED_BOX_VERSION: u8 = 1;

/// Length of an X25519 public key, and of HPKE's `enc` for this KEM.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Bytes of a [`SealedBox`] encoding before the ciphertext.
pub const SEALED_BOX_HEADER_LEN: usize = 1 + 2 + PUBLIC_KEY_LEN;

/// Smallest valid [`SealedBox`] encoding (empty plaintext).
pub const SEALED_BOX_MIN_LEN: usize = SEALED_BOX_HEADER_LEN + TAG_LEN;

/// RFC 9180 KEM id of DHKEM(X25519, HKDF-SHA256).
const KEM_ID: u16 = 0x0020;
/// RFC 9180 KDF id of HKDF-SHA256.
const KDF_ID: u16 = 0x0001;
/// `suite_id` of the KEM: "KEM" || I2OSP(kem_id, 2).
const KEM_SUITE_ID: [u8; 5] = [b'K', b'E', b'M', 0x00, 0x20];
/// RFC 9180 mode_base.
const MODE_BASE: u8 = 0x00;

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

    /// The full HPKE `suite_id`: "HPKE" || kem_id || kdf_id || aead_id.
    fn suite_id(self) -> [u8; 10] {
        let k = KEM_ID.to_be_bytes();
        let f = KDF_ID.to_be_bytes();
        let a = self.id().to_be_bytes();
        [b'H', b'P', b'K', b'E', k[0], k[1], f[0], f[1], a[0], a[1]]
    }
}

/// RFC 9180 `LabeledExtract(salt, label, ikm)`; returns the PRK and an
/// HKDF instance keyed with it.
fn labeled_extract(
    suite_id: &[u8],
    salt: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> (Zeroizing<[u8; 32]>, Hkdf<Sha256>) {
    let mut ext = HkdfExtract::<Sha256>::new(Some(salt));
    ext.input_ikm(b"HPKE-v1");
    ext.input_ikm(suite_id);
    ext.input_ikm(label);
    ext.input_ikm(ikm);
    let (mut prk, hk) = ext.finalize();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&prk);
    prk.as_mut_slice().zeroize();
    (out, hk)
}

/// RFC 9180 `LabeledExpand(prk, label, info, L)` into `out` (L = out.len()).
fn labeled_expand(
    hk: &Hkdf<Sha256>,
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), Error> {
    let len = u16::try_from(out.len())
        .map_err(|_| Error::InvalidLength {
            what: "HKDF output",
            got: out.len(),
            expected: 32,
        })?
        .to_be_bytes();
    hk.expand_multi_info(&[&len, b"HPKE-v1", suite_id, label, info], out)
        .map_err(|_| Error::InvalidLength {
            what: "HKDF output",
            got: out.len(),
            expected: 32,
        })
}

/// RFC 9180 `DeriveKeyPair(ikm)` for DHKEM(X25519, HKDF-SHA256).
fn derive_keypair(ikm: &[u8]) -> Result<(StaticSecret, [u8; 32]), Error> {
    let (_, dkp_prk) = labeled_extract(&KEM_SUITE_ID, b"", b"dkp_prk", ikm);
    let mut sk = Zeroizing::new([0u8; 32]);
    labeled_expand(&dkp_prk, &KEM_SUITE_ID, b"sk", b"", &mut sk[..])?;
    let secret = StaticSecret::from(*sk);
    let public = PublicKey::from(&secret).to_bytes();
    Ok((secret, public))
}

/// RFC 9180 `ExtractAndExpand(dh, enc || pkR)`.
fn extract_and_expand(
    dh: &[u8; 32],
    enc: &[u8; 32],
    pk_r: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, Error> {
    let (_, eae_prk) = labeled_extract(&KEM_SUITE_ID, b"", b"eae_prk", dh);
    let mut kem_context = [0u8; 64];
    kem_context[..32].copy_from_slice(enc);
    kem_context[32..].copy_from_slice(pk_r);
    let mut shared = Zeroizing::new([0u8; 32]);
    labeled_expand(
        &eae_prk,
        &KEM_SUITE_ID,
        b"shared_secret",
        &kem_context,
        &mut shared[..],
    )?;
    Ok(shared)
}

/// `Encap(pkR)` with the ephemeral key derived from `ikm_e`; returns
/// `(shared_secret, enc)`.
fn encap(ikm_e: &[u8], pk_r: &[u8; 32]) -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), Error> {
    let (sk_e, enc) = derive_keypair(ikm_e)?;
    let dh = sk_e.diffie_hellman(&PublicKey::from(*pk_r));
    if !dh.was_contributory() {
        return Err(Error::InvalidPublicKey);
    }
    let shared = extract_and_expand(dh.as_bytes(), &enc, pk_r)?;
    Ok((shared, enc))
}

/// `Decap(enc, skR)`.
fn decap(
    sk_r: &StaticSecret,
    pk_r: &[u8; 32],
    enc: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, Error> {
    let dh = sk_r.diffie_hellman(&PublicKey::from(*enc));
    if !dh.was_contributory() {
        return Err(Error::InvalidPublicKey);
    }
    extract_and_expand(dh.as_bytes(), enc, pk_r)
}

/// The AEAD key and base nonce of a base-mode context.
struct KeySchedule {
    key: Zeroizing<[u8; 32]>,
    key_len: usize,
    base_nonce: [u8; NONCE_LEN],
}

impl KeySchedule {
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// RFC 9180 `KeySchedule(mode_base, shared_secret, info, "", "")`.
fn key_schedule(aead: AeadId, shared_secret: &[u8; 32], info: &[u8]) -> Result<KeySchedule, Error> {
    let suite = aead.suite_id();
    let (psk_id_hash, _) = labeled_extract(&suite, b"", b"psk_id_hash", b"");
    let (info_hash, _) = labeled_extract(&suite, b"", b"info_hash", info);
    let mut ctx = [0u8; 65];
    ctx[0] = MODE_BASE;
    ctx[1..33].copy_from_slice(&psk_id_hash[..]);
    ctx[33..].copy_from_slice(&info_hash[..]);
    let (_, secret) = labeled_extract(&suite, shared_secret, b"secret", b"");
    let key_len = aead.key_len();
    let mut key = Zeroizing::new([0u8; 32]);
    labeled_expand(&secret, &suite, b"key", &ctx, &mut key[..key_len])?;
    let mut base_nonce = [0u8; NONCE_LEN];
    labeled_expand(&secret, &suite, b"base_nonce", &ctx, &mut base_nonce)?;
    Ok(KeySchedule {
        key,
        key_len,
        base_nonce,
    })
}

/// An X25519 key pair for HPKE (the bubble's credential key, or a parent's
/// result key). The secret is zeroized on drop and never printed.
pub struct KemKeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KemKeyPair {
    /// Generates a key pair (RFC 9180 `GenerateKeyPair`: `DeriveKeyPair` of
    /// 32 random bytes).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut ikm = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut ikm[..]);
        // A 32-byte IKM and a 32-byte output cannot fail to expand.
        Self::derive(&ikm[..]).unwrap_or_else(|_| Self::from_secret_bytes(&ikm))
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
        let (secret, public) = derive_keypair(ikm)?;
        Ok(Self { secret, public })
    }

    /// Rebuilds a key pair from its serialized 32-byte private key.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        let secret = StaticSecret::from(*secret);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The serialized private key (handle with care; zeroized on drop).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
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

/// An HPKE single-shot ciphertext: the encapsulated key and the AEAD
/// ciphertext (with tag). See the module docs for the wire format.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBox {
    /// The AEAD the box was sealed with.
    pub aead: AeadId,
    /// HPKE `enc`: the sender's ephemeral X25519 public key.
    pub enc: [u8; 32],
    /// AEAD ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl SealedBox {
    /// Length of [`SealedBox::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        SEALED_BOX_HEADER_LEN + self.ciphertext.len()
    }

    /// The version-1 wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(SEALED_BOX_VERSION);
        out.extend_from_slice(&self.aead.id().to_be_bytes());
        out.extend_from_slice(&self.enc);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses the wire encoding; checks version, AEAD id and lengths.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(Error::Truncated {
                what: "sealed box",
                got: 0,
                need: SEALED_BOX_MIN_LEN,
            });
        };
        if version != SEALED_BOX_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "sealed box",
                version,
            });
        }
        if bytes.len() < SEALED_BOX_MIN_LEN {
            return Err(Error::Truncated {
                what: "sealed box",
                got: bytes.len(),
                need: SEALED_BOX_MIN_LEN,
            });
        }
        let (id, rest) = rest.split_at(2);
        let aead = AeadId::from_id(u16::from_be_bytes([id[0], id[1]]))?;
        let (enc_bytes, ciphertext) = rest.split_at(PUBLIC_KEY_LEN);
        let mut enc = [0u8; 32];
        enc.copy_from_slice(enc_bytes);
        Ok(Self {
            aead,
            enc,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

impl fmt::Debug for SealedBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBox")
            .field("aead", &self.aead)
            .field("enc", &Hex(&self.enc))
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// The AAD binding a credential to its bubble and name, unambiguously:
/// `u64 LE len(bubble_id) || bubble_id || u64 LE len(name) || name`.
pub fn credential_aad(bubble_id: &str, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + bubble_id.len() + name.len());
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    push_len_prefixed(&mut out, name.as_bytes());
    out
}

/// Appends `u64 LE len(bytes) || bytes`.
pub(crate) fn push_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Seals with the ephemeral key derived from `ikm_e` (the RNG's 32 bytes).
fn seal_with_ikm(
    aead: AeadId,
    ikm_e: &[u8],
    recipient_pk: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<SealedBox, Error> {
    let (shared, enc) = encap(ikm_e, recipient_pk)?;
    let ks = key_schedule(aead, &shared, info)?;
    // Sequence number 0: the nonce is the base nonce.
    let ciphertext = aead::seal(aead, ks.key(), &ks.base_nonce, aad, plaintext)
        .map_err(|_| Error::OpenFailed)?;
    Ok(SealedBox {
        aead,
        enc,
        ciphertext,
    })
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
    let mut ikm_e = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut ikm_e[..]);
    seal_with_ikm(aead, &ikm_e[..], recipient_pk, info, aad, plaintext)
}

/// Opens a [`SealedBox`] with the recipient's key pair; `info` and `aad`
/// must equal the sender's. The plaintext comes back as [`SecretBytes`].
pub fn open_credential(
    recipient: &KemKeyPair,
    sealed: &SealedBox,
    info: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, Error> {
    if sealed.ciphertext.len() < TAG_LEN {
        return Err(Error::Truncated {
            what: "sealed box ciphertext",
            got: sealed.ciphertext.len(),
            need: TAG_LEN,
        });
    }
    let shared = decap(&recipient.secret, &recipient.public, &sealed.enc)?;
    let ks = key_schedule(sealed.aead, &shared, info)?;
    aead::open(
        sealed.aead,
        ks.key(),
        &ks.base_nonce,
        aad,
        &sealed.ciphertext,
    )
    .map_err(|e| match e {
        AeadFailure::Truncated => Error::Truncated {
            what: "sealed box ciphertext",
            got: sealed.ciphertext.len(),
            need: TAG_LEN,
        },
        AeadFailure::KeyLength | AeadFailure::Auth => Error::OpenFailed,
    })
}
