//! The built-in ops of the guest shim and their payloads.
//!
//! | op | input | output |
//! |---|---|---|
//! | `echo` | bytes | the same bytes |
//! | `sha256` | bytes | SHA-256 (32) |
//! | `sha256_chain` | [`Sha256Chain`] | SHA-256 iterated (32) |
//! | `keys` | empty | [`PublicKeys`] |
//! | `attest` | nonce (16 to 64 bytes) | [`AttestBinding`] |
//! | `provision` | [`Provision`] | empty |
//! | `hmac` | [`Hmac`] | HMAC-SHA256 (32) |
//! | `set_policy` | [`crate::policy`] wire form | its SHA-256 (32) |
//! | `load_portion` | [`LoadPortion`] | the new portions digest (48) |
//! | `portion` | [`PortionCall`] | the portion's output |
//! | `portion_sealed` | [`SealedPortionCall`] | the portion's output |
//!
//! With the SIGN flag any op answers a [`SignedResult`] instead.

use crate::wire::{Reader, Writer};
use crate::{
    AbiError, MAX_BUBBLE_ID_LEN, MAX_NAME_LEN, MAX_NONCE_LEN, MAX_OP_LEN, MIN_NONCE_LEN,
    POLICY_DIGEST_LEN, PORTIONS_DIGEST_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN,
};

/// Op: return the input.
pub const OP_ECHO: &str = "echo";
/// Op: SHA-256 of the input.
pub const OP_SHA256: &str = "sha256";
/// Op: iterated SHA-256.
pub const OP_SHA256_CHAIN: &str = "sha256_chain";
/// Op: the bubble's public keys.
pub const OP_KEYS: &str = "keys";
/// Op: the attestation binding of a nonce.
pub const OP_ATTEST: &str = "attest";
/// Op: open a sealed credential into the bubble.
pub const OP_PROVISION: &str = "provision";
/// Op: HMAC-SHA256 with a credential.
pub const OP_HMAC: &str = "hmac";
/// Op: set the security policy (once, before any portion).
pub const OP_SET_POLICY: &str = "set_policy";
/// Op: load a WebAssembly portion.
pub const OP_LOAD_PORTION: &str = "load_portion";
/// Op: call a function of a loaded portion.
pub const OP_PORTION: &str = "portion";
/// Op: call a function of a loaded portion with an input sealed to the
/// bubble (HPKE; the guest opens it and refuses a replayed sequence number).
pub const OP_PORTION_SEALED: &str = "portion_sealed";

fn check_short(field: &'static str, b: &[u8], max: usize) -> Result<(), AbiError> {
    if b.is_empty() || b.len() > max {
        return Err(AbiError::BadLength {
            field,
            len: b.len() as u64,
        });
    }
    Ok(())
}

#[cfg(feature = "alloc")]
fn to_vec(
    len: usize,
    f: impl FnOnce(&mut [u8]) -> Result<usize, AbiError>,
) -> Result<alloc::vec::Vec<u8>, AbiError> {
    let mut v = alloc::vec![0u8; len];
    let n = f(&mut v)?;
    v.truncate(n);
    Ok(v)
}

/// `portion` input: `[len u8][portion][len u8][function][input]`. The
/// signature of a signed portion call covers this whole frame, so it binds
/// the portion and the function as well as the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortionCall<'a> {
    /// The portion's name (1 to [`MAX_NAME_LEN`] bytes).
    pub portion: &'a str,
    /// The exported function (1 to [`MAX_OP_LEN`] bytes).
    pub function: &'a str,
    /// The function's input.
    pub input: &'a [u8],
}

impl<'a> PortionCall<'a> {
    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        2 + self.portion.len() + self.function.len() + self.input.len()
    }

    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        let mut w = Writer::new(out);
        w.short("portion", self.portion.as_bytes(), MAX_NAME_LEN)?;
        w.short("function", self.function.as_bytes(), MAX_OP_LEN)?;
        w.put(self.input)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        to_vec(self.encoded_len(), |o| self.encode_into(o))
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let portion = r.short_str("portion", MAX_NAME_LEN)?;
        let function = r.short_str("function", MAX_OP_LEN)?;
        Ok(Self {
            portion,
            function,
            input: r.rest(),
        })
    }
}

/// `portion_sealed` input:
/// `[len u8][bubble id][len u8][portion][len u8][function][seq u64][sealed box]`.
///
/// The sealed box is the function's input, HPKE-sealed to the bubble's KEM
/// key with AAD binding the bubble id, portion, function and `seq`
/// (`bubble_keys::sealed_input_aad`); `seq` is the per-call nonce the
/// guest's replay window checks. A signed call's signature covers this
/// whole frame (ciphertext included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedPortionCall<'a> {
    /// The bubble's id, as the sealer bound it (1 to [`MAX_BUBBLE_ID_LEN`] bytes).
    pub bubble_id: &'a str,
    /// The portion's name (1 to [`MAX_NAME_LEN`] bytes).
    pub portion: &'a str,
    /// The exported function (1 to [`MAX_OP_LEN`] bytes).
    pub function: &'a str,
    /// The per-call sequence number (nonce), bound into the AAD.
    pub seq: u64,
    /// The HPKE sealed box of the input (at least one byte).
    pub sealed: &'a [u8],
}

impl<'a> SealedPortionCall<'a> {
    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        3 + self.bubble_id.len() + self.portion.len() + self.function.len() + 8 + self.sealed.len()
    }

    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        check_short("sealed", self.sealed, usize::MAX)?;
        let mut w = Writer::new(out);
        w.short("bubble id", self.bubble_id.as_bytes(), MAX_BUBBLE_ID_LEN)?;
        w.short("portion", self.portion.as_bytes(), MAX_NAME_LEN)?;
        w.short("function", self.function.as_bytes(), MAX_OP_LEN)?;
        w.put(&self.seq.to_le_bytes())?;
        w.put(self.sealed)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        to_vec(self.encoded_len(), |o| self.encode_into(o))
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let bubble_id = r.short_str("bubble id", MAX_BUBBLE_ID_LEN)?;
        let portion = r.short_str("portion", MAX_NAME_LEN)?;
        let function = r.short_str("function", MAX_OP_LEN)?;
        let seq = r.u64()?;
        let sealed = r.rest();
        check_short("sealed", sealed, usize::MAX)?;
        Ok(Self {
            bubble_id,
            portion,
            function,
            seq,
            sealed,
        })
    }
}

/// The answer to a signed call: `[call_id u64][sealed u8][signature 64][output]`;
/// `output` is sealed to the caller's key when `sealed` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedResult<'a> {
    /// The bubble's call counter, bound into the signature.
    pub call_id: u64,
    /// Whether `output` is sealed.
    pub sealed: bool,
    /// Ed25519 signature.
    pub signature: [u8; SIGNATURE_LEN],
    /// The output (or its sealed box).
    pub output: &'a [u8],
}

impl<'a> SignedResult<'a> {
    /// Size of everything before the output.
    pub const PREFIX_LEN: usize = 8 + 1 + SIGNATURE_LEN;

    /// Writes the answer into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        let mut w = Writer::new(out);
        w.put(&self.call_id.to_le_bytes())?;
        w.put(&[u8::from(self.sealed)])?;
        w.put(&self.signature)?;
        w.put(self.output)?;
        Ok(w.len())
    }

    /// The answer as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        let mut v = alloc::vec::Vec::with_capacity(Self::PREFIX_LEN + self.output.len());
        v.extend_from_slice(&self.call_id.to_le_bytes());
        v.push(u8::from(self.sealed));
        v.extend_from_slice(&self.signature);
        v.extend_from_slice(self.output);
        v
    }

    /// Decodes an answer.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let call_id = r.u64()?;
        let sealed = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(AbiError::BadValue { field: "sealed" }),
        };
        let signature = r.array()?;
        Ok(Self {
            call_id,
            sealed,
            signature,
            output: r.rest(),
        })
    }
}

/// The answer to `keys`: `[kem_pk 32][sig_pk 32]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKeys {
    /// X25519 HPKE public key (credentials are sealed to it).
    pub kem_pk: [u8; PUBLIC_KEY_LEN],
    /// Ed25519 public key (results are signed with it).
    pub sig_pk: [u8; PUBLIC_KEY_LEN],
}

impl PublicKeys {
    /// Size of the encoding.
    pub const LEN: usize = 2 * PUBLIC_KEY_LEN;

    /// Encodes the keys.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..32].copy_from_slice(&self.kem_pk);
        b[32..].copy_from_slice(&self.sig_pk);
        b
    }

    /// Decodes the keys (exact length).
    pub fn decode(b: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let k = Self {
            kem_pk: r.array()?,
            sig_pk: r.array()?,
        };
        r.end()?;
        Ok(k)
    }
}

/// Whether `nonce` has an acceptable length for `attest`.
pub fn check_nonce(nonce: &[u8]) -> Result<(), AbiError> {
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(AbiError::BadLength {
            field: "nonce",
            len: nonce.len() as u64,
        })
    }
}

/// The answer to `attest`:
/// `[kem_pk 32][sig_pk 32][report_data 64][portions_digest 48][policy_digest 32]`.
///
/// `report_data` binds `nonce ‖ portions_digest ‖ policy_digest` to the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttestBinding {
    /// X25519 HPKE public key.
    pub kem_pk: [u8; PUBLIC_KEY_LEN],
    /// Ed25519 public key.
    pub sig_pk: [u8; PUBLIC_KEY_LEN],
    /// REPORT_DATA computed inside the bubble.
    pub report_data: [u8; 64],
    /// Digest of the loaded portions (zero: none).
    pub portions_digest: [u8; PORTIONS_DIGEST_LEN],
    /// SHA-256 of the security policy (zero: default).
    pub policy_digest: [u8; POLICY_DIGEST_LEN],
}

impl AttestBinding {
    /// Size of the encoding.
    pub const LEN: usize = 2 * PUBLIC_KEY_LEN + 64 + PORTIONS_DIGEST_LEN + POLICY_DIGEST_LEN;

    /// Encodes the binding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let mut w = Writer::new(&mut b);
        for f in [
            &self.kem_pk[..],
            &self.sig_pk,
            &self.report_data,
            &self.portions_digest,
            &self.policy_digest,
        ] {
            // The fields add up to LEN exactly.
            let _ = w.put(f);
        }
        b
    }

    /// Decodes the binding (exact length).
    pub fn decode(b: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let a = Self {
            kem_pk: r.array()?,
            sig_pk: r.array()?,
            report_data: r.array()?,
            portions_digest: r.array()?,
            policy_digest: r.array()?,
        };
        r.end()?;
        Ok(a)
    }
}

/// `provision` input: `[id_len u8][bubble id][name_len u8][name][sealed box]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Provision<'a> {
    /// The bubble's id (bound into the sealing's AAD).
    pub bubble_id: &'a str,
    /// The credential's name (1 to [`MAX_NAME_LEN`] bytes).
    pub name: &'a str,
    /// The HPKE sealed box (at least one byte).
    pub sealed: &'a [u8],
}

impl<'a> Provision<'a> {
    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        2 + self.bubble_id.len() + self.name.len() + self.sealed.len()
    }

    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        check_short("sealed", self.sealed, usize::MAX)?;
        let mut w = Writer::new(out);
        w.short("bubble id", self.bubble_id.as_bytes(), MAX_BUBBLE_ID_LEN)?;
        w.short("name", self.name.as_bytes(), MAX_NAME_LEN)?;
        w.put(self.sealed)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        to_vec(self.encoded_len(), |o| self.encode_into(o))
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let bubble_id = r.short_str("bubble id", MAX_BUBBLE_ID_LEN)?;
        let name = r.short_str("name", MAX_NAME_LEN)?;
        let sealed = r.rest();
        check_short("sealed", sealed, usize::MAX)?;
        Ok(Self {
            bubble_id,
            name,
            sealed,
        })
    }
}

/// `load_portion` input: `[name_len u8][name][module]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadPortion<'a> {
    /// The portion's name (1 to [`MAX_NAME_LEN`] bytes).
    pub name: &'a str,
    /// The WebAssembly module (at least one byte).
    pub module: &'a [u8],
}

impl<'a> LoadPortion<'a> {
    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        1 + self.name.len() + self.module.len()
    }

    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        check_short("module", self.module, usize::MAX)?;
        let mut w = Writer::new(out);
        w.short("name", self.name.as_bytes(), MAX_NAME_LEN)?;
        w.put(self.module)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        to_vec(self.encoded_len(), |o| self.encode_into(o))
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let name = r.short_str("name", MAX_NAME_LEN)?;
        let module = r.rest();
        check_short("module", module, usize::MAX)?;
        Ok(Self { name, module })
    }
}

/// `hmac` input: `[name_len u8][credential name][data]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hmac<'a> {
    /// The credential's name.
    pub name: &'a str,
    /// The data to authenticate.
    pub data: &'a [u8],
}

impl<'a> Hmac<'a> {
    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        let mut w = Writer::new(out);
        w.short("name", self.name.as_bytes(), MAX_NAME_LEN)?;
        w.put(self.data)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        to_vec(1 + self.name.len() + self.data.len(), |o| {
            self.encode_into(o)
        })
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let name = r.short_str("name", MAX_NAME_LEN)?;
        Ok(Self {
            name,
            data: r.rest(),
        })
    }
}

/// `sha256_chain` input: `[rounds u32][data]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sha256Chain<'a> {
    /// How many times SHA-256 is applied (0 counts as 1).
    pub rounds: u32,
    /// The data hashed first.
    pub data: &'a [u8],
}

impl<'a> Sha256Chain<'a> {
    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        let mut w = Writer::new(out);
        w.put(&self.rounds.to_le_bytes())?;
        w.put(self.data)?;
        Ok(w.len())
    }

    /// Decodes the frame.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let rounds = r.u32()?;
        Ok(Self {
            rounds,
            data: r.rest(),
        })
    }
}
