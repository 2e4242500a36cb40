//! The CALL payload (host → guest):
//!
//! `[flags u8][op_len u8][op]` then, if SIGN, `[id_len u8][bubble id]`,
//! then, if SEAL, `[seal_to 32]`, then `[input]` (the rest).
//!
//! SIGN asks the guest to sign the result over (bubble id, call id,
//! input, output); SEAL (only with SIGN) also seals the output to the
//! X25519 key `seal_to`. The answer of a signed call is a
//! [`crate::ops::SignedResult`]. The flags never change the op name, so an
//! op of [`MAX_OP_LEN`] bytes can be signed.

use crate::wire::{Reader, Writer};
use crate::{AbiError, MAX_BUBBLE_ID_LEN, MAX_OP_LEN, PUBLIC_KEY_LEN};

/// The flags byte of a CALL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallFlags(u8);

impl CallFlags {
    /// No flags: a plain call.
    pub const NONE: CallFlags = CallFlags(0);
    /// Sign the result; the bubble id follows the op.
    pub const SIGN: CallFlags = CallFlags(0x01);
    /// Seal the output to `seal_to` (requires SIGN); the key follows the id.
    pub const SEAL: CallFlags = CallFlags(0x02);
    /// Every defined flag, with its name in the documentation.
    pub const ALL: [(CallFlags, &'static str); 2] =
        [(CallFlags::SIGN, "SIGN"), (CallFlags::SEAL, "SEAL")];
    const KNOWN: u8 = 0x03;

    /// The flags of a byte: unknown bits, or SEAL without SIGN, are refused.
    pub fn from_bits(b: u8) -> Result<Self, AbiError> {
        let f = CallFlags(b);
        if b & !Self::KNOWN != 0 || (f.contains(Self::SEAL) && !f.contains(Self::SIGN)) {
            return Err(AbiError::BadFlags(b));
        }
        Ok(f)
    }

    /// The byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: CallFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The signing context of a signed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signing<'a> {
    /// The bubble's id, bound into the signature.
    pub bubble_id: &'a str,
    /// Seal the output to this X25519 public key.
    pub seal_to: Option<[u8; PUBLIC_KEY_LEN]>,
}

/// A CALL: op, optional signing, input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call<'a> {
    /// The op: 1 to [`MAX_OP_LEN`] bytes of UTF-8.
    pub op: &'a str,
    /// Sign (and maybe seal) the result.
    pub sign: Option<Signing<'a>>,
    /// The op's input.
    pub input: &'a [u8],
}

impl<'a> Call<'a> {
    /// A plain (unsigned) call.
    pub fn plain(op: &'a str, input: &'a [u8]) -> Self {
        Self {
            op,
            sign: None,
            input,
        }
    }

    /// The flags this call carries.
    pub fn flags(&self) -> CallFlags {
        match self.sign {
            None => CallFlags::NONE,
            Some(Signing { seal_to: None, .. }) => CallFlags::SIGN,
            Some(Signing {
                seal_to: Some(_), ..
            }) => CallFlags(CallFlags::SIGN.0 | CallFlags::SEAL.0),
        }
    }

    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        let sign = match &self.sign {
            None => 0,
            Some(s) => 1 + s.bubble_id.len() + s.seal_to.map_or(0, |_| PUBLIC_KEY_LEN),
        };
        2 + self.op.len() + sign + self.input.len()
    }

    /// Checks the limits an encoder must respect (op and id lengths).
    pub fn validate(&self) -> Result<(), AbiError> {
        if self.op.is_empty() || self.op.len() > MAX_OP_LEN {
            return Err(AbiError::BadLength {
                field: "op",
                len: self.op.len() as u64,
            });
        }
        if let Some(s) = &self.sign {
            if s.bubble_id.is_empty() || s.bubble_id.len() > MAX_BUBBLE_ID_LEN {
                return Err(AbiError::BadLength {
                    field: "bubble id",
                    len: s.bubble_id.len() as u64,
                });
            }
        }
        Ok(())
    }

    /// Writes the payload into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        self.validate()?;
        let mut w = Writer::new(out);
        w.put(&[self.flags().bits()])?;
        w.short("op", self.op.as_bytes(), MAX_OP_LEN)?;
        if let Some(s) = &self.sign {
            w.short("bubble id", s.bubble_id.as_bytes(), MAX_BUBBLE_ID_LEN)?;
            if let Some(k) = &s.seal_to {
                w.put(k)?;
            }
        }
        w.put(self.input)?;
        Ok(w.len())
    }

    /// The payload as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        let mut v = alloc::vec![0u8; self.encoded_len()];
        let n = self.encode_into(&mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// Decodes a CALL payload.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let flags = CallFlags::from_bits(r.u8()?)?;
        let op = r.short_str("op", MAX_OP_LEN)?;
        let sign = if flags.contains(CallFlags::SIGN) {
            let bubble_id = r.short_str("bubble id", MAX_BUBBLE_ID_LEN)?;
            let seal_to = if flags.contains(CallFlags::SEAL) {
                Some(r.array()?)
            } else {
                None
            };
            Some(Signing { bubble_id, seal_to })
        } else {
            None
        };
        Ok(Call {
            op,
            sign,
            input: r.rest(),
        })
    }

    /// Offset of the input within the encoding (for in-place use of the
    /// input in the mailbox).
    pub fn input_offset(&self) -> usize {
        self.encoded_len() - self.input.len()
    }
}
