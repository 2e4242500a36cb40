//! The bubble's own keys and the credentials provisioned into it.
//!
//! At boot the shim makes an X25519 key pair (HPKE KEM) and an Ed25519
//! signing key pair from RDRAND. The private keys never leave this module:
//! no op returns them, and they are zeroized on drop. Credentials arrive
//! sealed to the KEM key (HPKE, RFC 9180 base mode) and are opened here;
//! ops can use them (HMAC) but never read them out.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use bubble_keys::{KemKeyPair, SealedBox, SecretBytes, SigningKeyPair};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::rng::RdRand;

/// Most credentials a bubble holds.
pub const MAX_CREDENTIALS: usize = 64;
/// Longest credential (bytes of plaintext).
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// Keys and credentials of this bubble.
pub struct Keys {
    rng: RdRand,
    kem: KemKeyPair,
    sig: SigningKeyPair,
    creds: BTreeMap<String, SecretBytes>,
    next_call_id: u64,
}

/// Why an op on keys failed (text is safe to return: never secret).
pub type OpError = (u16, &'static str);

impl Keys {
    /// Generates the bubble's key pairs.
    pub fn generate() -> Option<Self> {
        let mut rng = RdRand::new()?;
        let kem = KemKeyPair::generate(&mut rng);
        let sig = SigningKeyPair::generate(&mut rng);
        Some(Self {
            rng,
            kem,
            sig,
            creds: BTreeMap::new(),
            next_call_id: 1,
        })
    }

    /// X25519 public key.
    pub fn kem_public(&self) -> [u8; 32] {
        self.kem.public_key()
    }

    /// Ed25519 public key.
    pub fn sig_public(&self) -> [u8; 32] {
        self.sig.public_key()
    }

    /// Opens a credential sealed to this bubble and keeps it under `name`.
    pub fn provision(&mut self, bubble_id: &str, name: &str, sealed: &[u8]) -> Result<(), OpError> {
        use crate::abi::code::BAD_INPUT;
        if !self.creds.contains_key(name) && self.creds.len() >= MAX_CREDENTIALS {
            return Err((BAD_INPUT, "too many credentials"));
        }
        let sealed = SealedBox::decode(sealed).map_err(|_| (BAD_INPUT, "malformed sealed box"))?;
        let aad = bubble_keys::credential_aad(bubble_id, name);
        let secret =
            bubble_keys::open_credential(&self.kem, &sealed, bubble_keys::INFO_CREDENTIAL, &aad)
                .map_err(|_| {
                    (
                        BAD_INPUT,
                        "sealed credential does not open for this bubble and name",
                    )
                })?;
        if secret.len() > MAX_CREDENTIAL_LEN {
            return Err((BAD_INPUT, "credential too long"));
        }
        self.creds.insert(String::from(name), secret);
        Ok(())
    }

    /// HMAC-SHA256 of `data` under the credential `name`.
    pub fn hmac(&self, name: &str, data: &[u8]) -> Result<[u8; 32], OpError> {
        let key = self
            .creds
            .get(name)
            .ok_or((crate::abi::code::BAD_INPUT, "no such credential"))?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose())
            .map_err(|_| (crate::abi::code::INTERNAL, "bad key length"))?;
        mac.update(data);
        Ok(mac.finalize().into_bytes().into())
    }

    /// Signs (and optionally seals) a call's result; returns
    /// `[call_id u64][sealed u8][signature 64][output]`.
    pub fn sign_result(
        &mut self,
        bubble_id: &str,
        input: &[u8],
        output: &[u8],
        seal_to: Option<&[u8; 32]>,
    ) -> Result<Vec<u8>, OpError> {
        let call_id = self.next_call_id;
        self.next_call_id += 1;
        let r = bubble_keys::produce_result(
            &mut self.rng,
            &self.sig,
            bubble_id,
            call_id,
            input,
            output,
            seal_to,
        )
        .map_err(|_| {
            (
                crate::abi::code::BAD_INPUT,
                "cannot seal to that public key",
            )
        })?;
        let mut out = Vec::with_capacity(8 + 1 + 64 + r.output.len());
        out.extend_from_slice(&r.call_id.to_le_bytes());
        out.push(u8::from(r.sealed));
        out.extend_from_slice(&r.signature);
        out.extend_from_slice(&r.output);
        Ok(out)
    }
}
