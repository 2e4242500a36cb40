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
use crate::fmt_util::{push_len_prefixed, Hex};
use crate::hpke::{open_credential, seal_credential, KemKeyPair, SealedBox};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{h32, TestRng};
    use alloc::format;
    use alloc::vec;

    fn stmt<'a>(output: &'a [u8]) -> ResultStatement<'a> {
        ResultStatement {
            bubble_id: "bub-1",
            call_id: 42,
            input_sha256: sha256(b"input"),
            sealed: false,
            output,
        }
    }

    #[test]
    fn rfc8032_test1_key_and_signature() {
        // RFC 8032 §7.1 TEST 1 (empty message) through our key type.
        let kp = SigningKeyPair::from_secret_bytes(&h32(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        assert_eq!(
            hex::encode(kp.public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let sig = kp.0.sign(b"").to_bytes();
        assert_eq!(
            hex::encode(sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
    }

    #[test]
    fn canonical_encoding_layout() {
        let s = ResultStatement {
            bubble_id: "ab",
            call_id: 0x0102,
            input_sha256: [0xee; 32],
            sealed: true,
            output: b"xyz",
        };
        let mut want = b"bubble-v1 result".to_vec();
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0xee; 32]);
        want.push(1);
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"xyz");
        assert_eq!(s.encode(), want);
    }

    #[test]
    fn sign_verify_and_every_field_matters() {
        let mut rng = TestRng::new(10);
        let kp = SigningKeyPair::generate(&mut rng);
        let pk = kp.public_key();
        let s = stmt(b"output");
        let sig = kp.sign_result(&s);
        verify_result(&pk, &s, &sig).unwrap();

        let variants = [
            ResultStatement {
                bubble_id: "bub-2",
                ..s
            },
            ResultStatement { call_id: 43, ..s },
            ResultStatement {
                input_sha256: sha256(b"inpuT"),
                ..s
            },
            ResultStatement { sealed: true, ..s },
            ResultStatement {
                output: b"outpuT",
                ..s
            },
            ResultStatement { output: b"", ..s },
        ];
        for v in &variants {
            assert_eq!(
                verify_result(&pk, v, &sig).unwrap_err(),
                Error::BadSignature
            );
        }
        let other = SigningKeyPair::generate(&mut rng);
        assert_eq!(
            verify_result(&other.public_key(), &s, &sig).unwrap_err(),
            Error::BadSignature
        );
    }

    #[test]
    fn length_prefixes_prevent_field_shifting() {
        let mut rng = TestRng::new(11);
        let kp = SigningKeyPair::generate(&mut rng);
        let a = ResultStatement {
            bubble_id: "ab",
            ..stmt(b"")
        };
        let b = ResultStatement {
            bubble_id: "a",
            ..stmt(b"")
        };
        assert_ne!(a.encode(), b.encode());
        let sig = kp.sign_result(&a);
        assert!(verify_result(&kp.public_key(), &b, &sig).is_err());
    }

    #[test]
    fn every_signature_bit_flip_and_bad_lengths_are_rejected() {
        let mut rng = TestRng::new(12);
        let kp = SigningKeyPair::generate(&mut rng);
        let pk = kp.public_key();
        let s = stmt(b"out");
        let sig = kp.sign_result(&s);
        for byte in 0..SIGNATURE_LEN {
            for bit in 0..8 {
                let mut t = sig;
                t[byte] ^= 1 << bit;
                assert!(verify_result(&pk, &s, &t).is_err(), "{byte}/{bit}");
            }
        }
        for n in [0usize, 1, 63, 65, 128] {
            let mut v = vec![0u8; n];
            v[..n.min(64)].copy_from_slice(&sig[..n.min(64)]);
            assert_eq!(
                verify_result(&pk, &s, &v).unwrap_err(),
                Error::InvalidLength {
                    what: "signature",
                    got: n,
                    expected: 64
                }
            );
        }
        // A public key that is not a curve point, and a small-order one.
        let mut not_a_point = [0xffu8; 32];
        not_a_point[31] = 0x7f;
        assert!(verify_result(&not_a_point, &s, &sig).is_err());
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(verify_result(&identity, &s, &sig).is_err());
    }

    #[test]
    fn key_serialization_and_debug() {
        let mut rng = TestRng::new(13);
        let kp = SigningKeyPair::generate(&mut rng);
        let seed = kp.secret_bytes();
        let again = SigningKeyPair::from_secret_bytes(&seed);
        assert_eq!(again.public_key(), kp.public_key());
        let d = format!("{kp:?}");
        assert!(d.contains(&hex::encode(kp.public_key())));
        assert!(d.contains("REDACTED"));
        assert!(!d.contains(&hex::encode(*seed)), "{d}");
        assert!(!d.contains(&format!("{:?}", &seed[..4])), "{d}");
    }

    #[test]
    fn produce_and_verify_plain_result() {
        let mut rng = TestRng::new(14);
        let signer = SigningKeyPair::generate(&mut rng);
        let pk = signer.public_key();
        let r = produce_result(&mut rng, &signer, "bub-1", 7, b"in", b"out", None).unwrap();
        assert!(!r.sealed);
        assert_eq!(r.output, b"out");
        let out =
            verify_and_open_result(&pk, "bub-1", 7, b"in", &r.output, &r.signature, None).unwrap();
        assert_eq!(out.expose(), b"out");
        // Wrong input, call id, bubble, or a claim that it was sealed.
        assert!(
            verify_and_open_result(&pk, "bub-1", 7, b"iN", &r.output, &r.signature, None).is_err()
        );
        assert!(
            verify_and_open_result(&pk, "bub-1", 8, b"in", &r.output, &r.signature, None).is_err()
        );
        assert!(
            verify_and_open_result(&pk, "bub-2", 7, b"in", &r.output, &r.signature, None).is_err()
        );
        let parent = KemKeyPair::generate(&mut rng);
        assert_eq!(
            verify_and_open_result(
                &pk,
                "bub-1",
                7,
                b"in",
                &r.output,
                &r.signature,
                Some(&parent)
            )
            .unwrap_err(),
            Error::BadSignature
        );
        let d = format!("{r:?}");
        assert!(d.contains("output_len: 3"));
    }

    #[test]
    fn produce_and_verify_sealed_result() {
        let mut rng = TestRng::new(15);
        let signer = SigningKeyPair::generate(&mut rng);
        let pk = signer.public_key();
        let parent = KemKeyPair::generate(&mut rng);
        let secret_out = b"tok_4242424242424242";
        let r = produce_result(
            &mut rng,
            &signer,
            "bub-1",
            9,
            b"card",
            secret_out,
            Some(&parent.public_key()),
        )
        .unwrap();
        assert!(r.sealed);
        assert!(!r.output.windows(secret_out.len()).any(|w| w == secret_out));
        let out = verify_and_open_result(
            &pk,
            "bub-1",
            9,
            b"card",
            &r.output,
            &r.signature,
            Some(&parent),
        )
        .unwrap();
        assert_eq!(out.expose(), secret_out);

        // Not asking to open a sealed result: the sealed flag mismatches.
        assert_eq!(
            verify_and_open_result(&pk, "bub-1", 9, b"card", &r.output, &r.signature, None)
                .unwrap_err(),
            Error::BadSignature
        );
        // Another parent's key: signature is fine, opening fails.
        let other = KemKeyPair::generate(&mut rng);
        assert_eq!(
            verify_and_open_result(
                &pk,
                "bub-1",
                9,
                b"card",
                &r.output,
                &r.signature,
                Some(&other)
            )
            .unwrap_err(),
            Error::OpenFailed
        );
        // Any bit flip of the sealed output breaks the signature.
        for byte in 0..r.output.len() {
            let mut t = r.output.clone();
            t[byte] ^= 0x10;
            assert_eq!(
                verify_and_open_result(&pk, "bub-1", 9, b"card", &t, &r.signature, Some(&parent))
                    .unwrap_err(),
                Error::BadSignature
            );
        }
    }

    #[test]
    fn sealed_output_is_bound_to_call() {
        let mut rng = TestRng::new(16);
        let parent = KemKeyPair::generate(&mut rng);
        let ih = sha256(b"in");
        let sealed = seal_result(&mut rng, &parent.public_key(), "bub-1", 1, &ih, b"r").unwrap();
        assert_eq!(
            open_result(&parent, "bub-1", 1, &ih, &sealed)
                .unwrap()
                .expose(),
            b"r"
        );
        assert!(open_result(&parent, "bub-1", 2, &ih, &sealed).is_err());
        assert!(open_result(&parent, "bub-2", 1, &ih, &sealed).is_err());
        assert!(open_result(&parent, "bub-1", 1, &sha256(b"x"), &sealed).is_err());
        // A result box is not a credential box (different info).
        assert!(open_credential(
            &parent,
            &sealed,
            crate::hpke::INFO_CREDENTIAL,
            &result_aad("bub-1", 1, &ih)
        )
        .is_err());
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
