//! The [`SealedBox`] wire format (see the parent module's docs).

use super::{AeadId, PUBLIC_KEY_LEN, TAG_LEN};
use crate::error::Error;
use crate::fmt_util::Hex;
use alloc::vec::Vec;
use core::fmt;

/// Version byte of the [`SealedBox`] wire format.
pub const SEALED_BOX_VERSION: u8 = 1;

/// Bytes of a [`SealedBox`] encoding before the ciphertext.
pub const SEALED_BOX_HEADER_LEN: usize = 1 + 2 + PUBLIC_KEY_LEN;

/// Smallest valid [`SealedBox`] encoding (empty plaintext).
pub const SEALED_BOX_MIN_LEN: usize = SEALED_BOX_HEADER_LEN + TAG_LEN;

/// An HPKE single-shot ciphertext: the encapsulated key and the AEAD
/// ciphertext (with tag). See the module docs for the wire format.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBox {
    /// The AEAD the box was sealed with.
    pub aead: AeadId,
    /// HPKE `enc`: the sender's ephemeral X25519 public key.
    pub enc: [u8; PUBLIC_KEY_LEN],
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
        let mut enc = [0u8; PUBLIC_KEY_LEN];
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
