//! Envelope encryption of frozen (suspended) bubbles.
//!
//! Each snapshot gets a fresh random 256-bit [`DataKey`]. The snapshot is
//! cut into chunks, each encrypted with AES-256-GCM under the data key by a
//! [`ChunkCipher`] (which prepares the key once for all of a snapshot's
//! chunks):
//!
//! ```text
//! chunk = nonce (12 random bytes) || ciphertext || tag (16 bytes)
//! AAD   = "bubble-v1 chunk" || snapshot_id (16 bytes) || u64 LE chunk_index
//! ```
//!
//! so a chunk cannot be moved to another position or snapshot. The data key
//! is wrapped by a key-encryption key ([`Kek`], held by the host or supplied
//! by the parent) with [`wrap_key`]:
//!
//! ```text
//! wrapped = version (1) || nonce (12) || AES-256-GCM(dk) (32) || tag (16)
//! AAD     = "bubble-v1 key wrap" || version || snapshot_id
//! ```
//!
//! Random 96-bit nonces are safe here: each data key encrypts one snapshot
//! (far fewer than 2^32 chunks), and each KEK wraps one key per snapshot.
//!
//! Modules: [`DataKey`] and [`Kek`] in `keys`, [`ChunkCipher`] in `chunk`,
//! [`wrap_key`] and [`unwrap_key`] in `wrap`, and (host only) loading and
//! creating a KEK file in `file`.

mod chunk;
#[cfg(feature = "std")]
mod file;
mod keys;
mod wrap;

use crate::aead::{NONCE_LEN, TAG_LEN};

pub use chunk::ChunkCipher;
#[cfg(feature = "std")]
pub use file::KekFileError;
pub use keys::{DataKey, Kek};
#[cfg(feature = "std")]
pub use wrap::wrap_key;
pub use wrap::{unwrap_key, wrap_key_with_rng};

/// Domain prefix of a chunk's AAD.
pub const CHUNK_AAD_DOMAIN: &[u8] = b"bubble-v1 chunk";
/// Domain prefix of a wrapped key's AAD.
pub const WRAP_AAD_DOMAIN: &[u8] = b"bubble-v1 key wrap";
/// Bytes an encrypted chunk adds to its plaintext (nonce + tag).
pub const CHUNK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Version byte of a wrapped data key.
pub const WRAPPED_KEY_VERSION: u8 = 1;
/// Length of a wrapped data key.
pub const WRAPPED_KEY_LEN: usize = 1 + NONCE_LEN + 32 + TAG_LEN;
/// Length of a snapshot id.
pub const SNAPSHOT_ID_LEN: usize = 16;

/// The snapshot id used by this module's tests.
#[cfg(test)]
const TEST_SNAP: [u8; SNAPSHOT_ID_LEN] = [0xab; SNAPSHOT_ID_LEN];
