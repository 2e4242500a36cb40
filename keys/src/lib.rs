//! Key material and cryptographic formats of bubbled, shared by the host
//! (broker, client library) and the bare-metal guest shim.
//!
//! The crate is `#![no_std]` + `alloc`. Nothing in it draws randomness by
//! itself: every function that needs randomness takes an
//! `RngCore + CryptoRng` (the guest passes its RDRAND-backed RNG). The
//! default `std` feature adds host conveniences: `OsRng`-based wrappers and
//! [`Kek::load_or_create`].
//!
//! Contents:
//! - [`SecretBytes`] and the key types: zeroized on drop, redacted `Debug`;
//! - [`hpke`]: RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//!   AES-256-GCM (also AES-128-GCM and ChaCha20-Poly1305) through the `hpke`
//!   crate, and the [`SealedBox`] wire format used to provision credentials;
//! - [`sign`]: Ed25519 signatures over canonical [`ResultStatement`]s, and
//!   results sealed to a parent's X25519 key;
//! - [`session`]: sealed sessions, one HPKE setup of an AES-256-GCM key
//!   per parent handle and bubble, then one AES-GCM open per call;
//! - [`report_data`]: the canonical REPORT_DATA binding of the nonce and the
//!   bubble's public keys;
//! - [`envelope`]: chunked AES-256-GCM encryption of frozen bubbles under a
//!   per-snapshot data key wrapped by a key-encryption key.
//!
//! # Example: provisioning a credential and returning a signed result
//! ```
//! # #[cfg(not(feature = "std"))]
//! # fn main() {}
//! # #[cfg(feature = "std")]
//! # fn main() -> Result<(), bubble_keys::Error> {
//! use bubble_keys::*;
//! let mut rng = OsRng; // in the guest: the RDRAND-backed RNG
//! // Inside the bubble, at boot:
//! let kem = KemKeyPair::generate(&mut rng);
//! let signer = SigningKeyPair::generate(&mut rng);
//! let rd = report_data(b"verifier nonce 16", &kem.public_key(), &signer.public_key());
//! # let _ = rd;
//! // Parent (after verifying the report): seal a credential to the bubble.
//! // The portions and policy digests the verified report binds.
//! let (portions, policy) = ([0u8; 48], [0u8; 32]);
//! let aad = credential_aad("bub-1", "gateway-key", &portions, &policy);
//! let wire = seal_credential(&mut rng, &kem.public_key(), INFO_CREDENTIAL, &aad, b"sk_live_x")?
//!     .encode();
//! // Bubble: open it (the broker only relayed `wire`).
//! let cred = open_credential(&kem, &SealedBox::decode(&wire)?, INFO_CREDENTIAL, &aad)?;
//! assert_eq!(cred.expose(), b"sk_live_x");
//! // Bubble: answer a call, sealed to the parent's key and signed.
//! let parent = KemKeyPair::generate(&mut rng);
//! let r = produce_result(&mut rng, &signer, "bub-1", 1, b"in", b"out", Some(&parent.public_key()))?;
//! // Parent: verify and open.
//! let out = verify_and_open_result(
//!     &signer.public_key(), "bub-1", r.call_id, b"in", &r.output, &r.signature, Some(&parent))?;
//! assert_eq!(out.expose(), b"out");
//! # Ok(())
//! # }
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod aead;
pub mod binding;
pub mod envelope;
mod error;
mod fmt_util;
pub mod hpke;
pub mod secret;
pub mod session;
pub mod sign;
#[cfg(test)]
mod test_util;

pub use binding::{report_data, REPORT_DATA_DOMAIN};
pub use envelope::{
    unwrap_key, wrap_key_with_rng, ChunkCipher, DataKey, Kek, CHUNK_OVERHEAD, SNAPSHOT_ID_LEN,
    WRAPPED_KEY_LEN,
};
#[cfg(feature = "std")]
pub use envelope::{wrap_key, KekFileError};
pub use error::Error;
pub use hpke::{
    credential_aad, open_credential, seal_credential, seal_credential_with, sealed_input_aad,
    AeadId, KemKeyPair, SealedBox, INFO_CREDENTIAL, INFO_SEALED_INPUT,
};
pub use secret::SecretBytes;
pub use session::{session_aad, session_call_aad, SessionKey, INFO_SESSION};
pub use sign::{
    open_result, produce_result, result_aad, seal_result, sha256, verify_and_open_result,
    verify_result, ResultStatement, SignedResult, SigningKeyPair, INFO_RESULT,
    RESULT_SIGNATURE_DOMAIN,
};

/// The rand_core (0.6) crate, for implementing an RNG (e.g. RDRAND).
pub use rand_core;
/// The `RngCore + CryptoRng` traits every randomized function takes.
pub use rand_core::{CryptoRng, RngCore};

/// The operating system's RNG (host only).
#[cfg(feature = "std")]
pub use rand_core::OsRng;
