//! The security policy for code portions: its wire form (the input of
//! `set_policy`) and its digest (which REPORT_DATA binds).
//!
//! `[fuel u64][memory u32][deadline_ms u32][max_output u32][n u16]` then n
//! grants, each `[len u8][portion][count u8]` and count × `[len u8][credential]`;
//! all integers little-endian, then, only if the policy sets a credential
//! rate, `[per_sec u32][burst u32]` (both non-zero; a policy without one
//! encodes as before, so its digest is unchanged). Fuel, memory, deadline
//! and output limits are non-zero. Every field the guest or the host enforces is in these bytes,
//! so the digest an attestation binds covers all of them.

use alloc::string::String;
use alloc::vec::Vec;

use sha2::{Digest, Sha256};

use crate::rate::CredentialRate;
use crate::wire::Reader;
use crate::AbiError;

/// A bubble's security policy for code portions, as the broker applies it
/// (`bubble.v1.SecurityPolicy` after validation and defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityPolicy {
    /// Fuel per call.
    pub fuel_per_call: u64,
    /// Linear-memory limit, bytes.
    pub memory_limit_bytes: u32,
    /// Wall-clock deadline per portion call, ms (the host enforces it; it
    /// is in the encoding, so the attested digest binds it).
    pub call_deadline_ms: u32,
    /// Largest output, bytes.
    pub max_output_bytes: u32,
    /// (portion, credentials it may use).
    pub grants: Vec<(String, Vec<String>)>,
    /// How fast a portion may use each credential (the guest enforces it
    /// with a token bucket per credential, [`crate::rate`]); `None`: no
    /// limit.
    pub credential_rate: Option<CredentialRate>,
}

impl Default for SecurityPolicy {
    fn default() -> Self {
        Self {
            fuel_per_call: 10_000_000,
            memory_limit_bytes: 1 << 20,
            call_deadline_ms: 10_000,
            max_output_bytes: 64 << 10,
            grants: Vec::new(),
            credential_rate: None,
        }
    }
}

fn short_str<'a>(r: &mut Reader<'a>, field: &'static str) -> Result<&'a str, AbiError> {
    let n = usize::from(r.u8()?);
    core::str::from_utf8(r.bytes(n)?).map_err(|_| AbiError::BadText { field })
}

impl SecurityPolicy {
    /// The canonical encoding: the bytes the guest's `set_policy` op takes.
    /// Names longer than 255 bytes and more than 255 credentials (or 65535
    /// grants) are cut, as the broker never sends them (it refuses them
    /// first).
    pub fn encode(&self) -> Vec<u8> {
        fn short(v: &mut Vec<u8>, s: &str) {
            let b = s.as_bytes();
            let b = b.get(..255).unwrap_or(b);
            v.push(b.len() as u8);
            v.extend_from_slice(b);
        }
        let mut v = Vec::new();
        v.extend_from_slice(&self.fuel_per_call.to_le_bytes());
        v.extend_from_slice(&self.memory_limit_bytes.to_le_bytes());
        v.extend_from_slice(&self.call_deadline_ms.to_le_bytes());
        v.extend_from_slice(&self.max_output_bytes.to_le_bytes());
        let grants = self
            .grants
            .get(..usize::from(u16::MAX))
            .unwrap_or(&self.grants);
        v.extend_from_slice(&(grants.len() as u16).to_le_bytes());
        for (p, creds) in grants {
            short(&mut v, p);
            let creds = creds.get(..255).unwrap_or(creds);
            v.push(creds.len() as u8);
            for c in creds {
                short(&mut v, c);
            }
        }
        if let Some(r) = self.credential_rate {
            v.extend_from_slice(&r.per_sec.to_le_bytes());
            v.extend_from_slice(&r.burst.to_le_bytes());
        }
        v
    }

    /// Decodes the wire form. Refuses zero limits and trailing bytes.
    pub fn decode(b: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let fuel_per_call = r.u64()?;
        let memory_limit_bytes = r.u32()?;
        let call_deadline_ms = r.u32()?;
        let max_output_bytes = r.u32()?;
        let n = r.u16()?;
        if fuel_per_call == 0
            || memory_limit_bytes == 0
            || call_deadline_ms == 0
            || max_output_bytes == 0
        {
            return Err(AbiError::BadValue {
                field: "policy limit",
            });
        }
        // Each grant takes at least two bytes: no allocation beyond the input.
        let mut grants = Vec::with_capacity(usize::from(n).min(b.len() / 2));
        for _ in 0..n {
            let portion = short_str(&mut r, "portion")?;
            let m = r.u8()?;
            let mut creds = Vec::with_capacity(usize::from(m));
            for _ in 0..m {
                creds.push(String::from(short_str(&mut r, "credential")?));
            }
            grants.push((String::from(portion), creds));
        }
        let credential_rate = if r.rest_len() == 0 {
            None
        } else {
            let per_sec = r.u32()?;
            let burst = r.u32()?;
            if per_sec == 0 || burst == 0 {
                return Err(AbiError::BadValue {
                    field: "credential rate",
                });
            }
            Some(CredentialRate { per_sec, burst })
        };
        r.end()?;
        Ok(Self {
            fuel_per_call,
            memory_limit_bytes,
            call_deadline_ms,
            max_output_bytes,
            grants,
            credential_rate,
        })
    }

    /// The policy digest REPORT_DATA binds: all zero for the default policy
    /// (the broker then sets none), else SHA-256 of [`Self::encode`].
    pub fn digest(&self) -> [u8; 32] {
        if *self == Self::default() {
            [0u8; 32]
        } else {
            wire_digest(&self.encode())
        }
    }
}

/// SHA-256 of a policy's wire form (what the guest answers to `set_policy`).
pub fn wire_digest(wire: &[u8]) -> [u8; 32] {
    Sha256::digest(wire).into()
}
