//! The crate's error type.

/// Everything that can go wrong in this crate. No variant carries secret
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An encoded object is shorter than its format requires.
    #[error("{what}: truncated ({got} bytes, need at least {need})")]
    Truncated {
        /// Which object.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Minimum length.
        need: usize,
    },
    /// A fixed-size value has the wrong length.
    #[error("{what}: wrong length ({got} bytes, expected {expected})")]
    InvalidLength {
        /// Which value.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Required length.
        expected: usize,
    },
    /// An encoded object has a version this build does not know.
    #[error("{what}: unsupported version {version}")]
    UnsupportedVersion {
        /// Which object.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// A sealed box names an AEAD this crate does not implement.
    #[error("unsupported HPKE AEAD id {0:#06x}")]
    UnsupportedAead(u16),
    /// The peer's X25519 public key is a low-order point (the shared secret
    /// would be all zero; RFC 9180 §7.1.4).
    #[error("invalid X25519 public key (low-order point)")]
    InvalidPublicKey,
    /// HPKE decryption failed: tampered box, wrong key, wrong `info` or `aad`.
    #[error("HPKE open failed (tampered, wrong key, or wrong info/aad)")]
    OpenFailed,
    /// An Ed25519 public key is not a valid curve point.
    #[error("invalid Ed25519 public key")]
    InvalidVerifyingKey,
    /// An Ed25519 signature does not verify for this statement and key.
    #[error("signature verification failed")]
    BadSignature,
    /// A frozen-bubble chunk failed authentication: tampered, wrong data
    /// key, wrong snapshot id or wrong chunk index.
    #[error("chunk {index} failed authentication (tampered, wrong key, snapshot or index)")]
    ChunkAuthentication {
        /// The chunk index the caller expected.
        index: u64,
    },
    /// A wrapped data key failed authentication: tampered, wrong KEK or
    /// wrong snapshot id.
    #[error("data key unwrap failed (tampered, wrong KEK or wrong snapshot)")]
    UnwrapFailed,
}
