//! Ed25519 signatures over call results, and results sealed to a parent.
//!
//! A bubble signs every result it returns as a [`ResultStatement`]. The
//! canonical, domain-separated encoding ([`ResultStatement::encode`]) is:
//!
//! ```text
//! "bubble-v1 result"                   16 bytes, fixed domain prefix
//! u64 LE len(bubble_id) || bubble_id   UTF-8
//! u64 LE call_id
//! input_sha256                         32 bytes
//! u8 sealed                            0 = output is plaintext,
//!                                      1 = output is a SealedBox encoding
//! u64 LE len(output) || output
//! ```
//!
//! When the parent asks for sealing, the output is sealed *inside* the
//! bubble to the parent's X25519 key with HPKE (`info` = [`INFO_RESULT`],
//! `aad` = [`result_aad`]) and the signature covers the sealed bytes
//! (encrypt-then-sign): anyone can check that the bubble produced them, only
//! the parent can read them, and the AAD pins them to this bubble, call and
//! input.

use crate::error::Error;
use crate::fmt_util::Hex;
use crate::hpke::{open_credential, push_len_prefixed, seal_credential, KemKeyPair, SealedBox};
use crate::secret::SecretBytes;
use alloc::vec::Vec;
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// Domain prefix of the signed result encoding.
pub const RESULT_SIGNATURE_DOMAIN: &[u8] = b"bubble-v1 result";

/// HPKE `info` for result outputs sealed to a parent.
pub const INFO_RESULT: &[u8] = b"bubble-v1 result";

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// SHA-256 of `data` (the `input_sha256` of a statement).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// An Ed25519 signing key pair (the bubble's result key). The secret is
/// zeroized on drop and never printed.
pub struct SigningKeyPair(SigningKey);

impl SigningKeyPair {
    /// Generates a key pair from 32 random bytes.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut seed[..]);
        Self(SigningKey::from_bytes(&seed))
    }

    /// Rebuilds a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed (handle with care; zeroized on drop).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs the canonical encoding of `statement`.
    pub fn sign_result(&self, statement: &ResultStatement<'_>) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&statement.encode()).to_bytes()
    }
}

impl ZeroizeOnDrop for SigningKeyPair {}

impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("public", &Hex(&self.public_key()))
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// What a bubble signs about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultStatement<'a> {
    /// The bubble's id.
    pub bubble_id: &'a str,
    /// The call id chosen by the bubble (monotonic per bubble).
    pub call_id: u64,
    /// SHA-256 of the call's input.
    pub input_sha256: [u8; 32],
    /// Whether `output` is a [`SealedBox`] encoding (sealed to the parent).
    pub sealed: bool,
    /// The output bytes exactly as returned to the parent.
    pub output: &'a [u8],
}

impl ResultStatement<'_> {
    /// The canonical byte string that is signed (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            RESULT_SIGNATURE_DOMAIN.len()
                + 8
                + self.bubble_id.len()
                + 8
                + 32
                + 1
                + 8
                + self.output.len(),
        );
        out.extend_from_slice(RESULT_SIGNATURE_DOMAIN);
        push_len_prefixed(&mut out, self.bubble_id.as_bytes());
        out.extend_from_slice(&self.call_id.to_le_bytes());
        out.extend_from_slice(&self.input_sha256);
        out.push(u8::from(self.sealed));
        push_len_prefixed(&mut out, self.output);
        out
    }
}

/// Verifies `signature` (64 bytes) over `statement` with the bubble's
/// Ed25519 public key (strict verification: no malleable signatures, no
/// small-order keys).
pub fn verify_result(
    public_key: &[u8; 32],
    statement: &ResultStatement<'_>,
    signature: &[u8],
) -> Result<(), Error> {
    let sig_bytes: &[u8; SIGNATURE_LEN] =
        signature.try_into().map_err(|_| Error::InvalidLength {
            what: "signature",
            got: signature.len(),
            expected: SIGNATURE_LEN,
        })?;
    let vk = VerifyingKey::from_bytes(public_key).map_err(|_| Error::InvalidVerifyingKey)?;
    let sig = Signature::from_bytes(sig_bytes);
    vk.verify_strict(&statement.encode(), &sig)
        .map_err(|_| Error::BadSignature)
}

/// The AAD of a result sealed to a parent:
/// `u64 LE len(bubble_id) || bubble_id || u64 LE call_id || input_sha256`.
pub fn result_aad(bubble_id: &str, call_id: u64, input_sha256: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bubble_id.len() + 8 + 32);
    push_len_prefixed(&mut out, bubble_id.as_bytes());
    out.extend_from_slice(&call_id.to_le_bytes());
    out.extend_from_slice(input_sha256);
    out
}

/// Seals a result's output to the parent's X25519 key (AES-256-GCM,
/// `info` = [`INFO_RESULT`], `aad` = [`result_aad`]).
pub fn seal_result<R: RngCore + CryptoRng>(
    rng: &mut R,
    parent_pk: &[u8; 32],
    bubble_id: &str,
    call_id: u64,
    input_sha256: &[u8; 32],
    output: &[u8],
) -> Result<SealedBox, Error> {
    let aad = result_aad(bubble_id, call_id, input_sha256);
    seal_credential(rng, parent_pk, INFO_RESULT, &aad, output)
}

/// Opens a result output sealed by [`seal_result`] with the parent's key.
pub fn open_result(
    parent: &KemKeyPair,
    bubble_id: &str,
    call_id: u64,
    input_sha256: &[u8; 32],
    sealed: &SealedBox,
) -> Result<SecretBytes, Error> {
    let aad = result_aad(bubble_id, call_id, input_sha256);
    open_credential(parent, sealed, INFO_RESULT, &aad)
}

/// A signed result as it leaves the bubble.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedResult {
    /// The call id the bubble chose.
    pub call_id: u64,
    /// Whether `output` is a sealed box encoding.
    pub sealed: bool,
    /// The output: plaintext, or a [`SealedBox`] encoding when `sealed`.
    pub output: Vec<u8>,
    /// Ed25519 signature over the [`ResultStatement`].
    pub signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for SignedResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedResult")
            .field("call_id", &self.call_id)
            .field("sealed", &self.sealed)
            .field("output_len", &self.output.len())
            .field("signature", &Hex(&self.signature))
            .finish()
    }
}

/// Guest side: optionally seals `output` to `seal_to` and signs the
/// statement over (bubble id, call id, SHA-256 of `input`, output bytes).
pub fn produce_result<R: RngCore + CryptoRng>(
    rng: &mut R,
    signer: &SigningKeyPair,
    bubble_id: &str,
    call_id: u64,
    input: &[u8],
    output: &[u8],
    seal_to: Option<&[u8; 32]>,
) -> Result<SignedResult, Error> {
    let input_sha256 = sha256(input);
    let (sealed, output) = match seal_to {
        Some(pk) => (
            true,
            seal_result(rng, pk, bubble_id, call_id, &input_sha256, output)?.encode(),
        ),
        None => (false, output.to_vec()),
    };
    let signature = signer.sign_result(&ResultStatement {
        bubble_id,
        call_id,
        input_sha256,
        sealed,
        output: &output,
    });
    Ok(SignedResult {
        call_id,
        sealed,
        output,
        signature,
    })
}

/// Parent side: verifies the signature over (bubble id, call id,
/// SHA-256 of `input`, `output`) and, when the parent asked for sealing
/// (`open_with` is its key pair), opens the sealed output. Returns the
/// plaintext output.
pub fn verify_and_open_result(
    bubble_sig_pk: &[u8; 32],
    bubble_id: &str,
    call_id: u64,
    input: &[u8],
    output: &[u8],
    signature: &[u8],
    open_with: Option<&KemKeyPair>,
) -> Result<SecretBytes, Error> {
    let input_sha256 = sha256(input);
    let statement = ResultStatement {
        bubble_id,
        call_id,
        input_sha256,
        sealed: open_with.is_some(),
        output,
    };
    verify_result(bubble_sig_pk, &statement, signature)?;
    match open_with {
        None => Ok(SecretBytes::from_slice(output)),
        Some(kem) => {
            let sealed = SealedBox::decode(output)?;
            open_result(kem, bubble_id, call_id, &input_sha256, &sealed)
        }
    }
}
