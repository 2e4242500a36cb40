//! Signed usage reports: the broker signs each bubble's metering numbers
//! with its own Ed25519 key so that billing can trust them.
//!
//! The signature covers `signed_json`, the canonical JSON of the `Usage`
//! message (fields in proto order); verify the signature over those exact
//! bytes, then parse them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bubble_proto::v1 as pb;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use zeroize::Zeroizing;

/// The broker's usage-signing key (zeroized on drop by ed25519-dalek).
pub struct UsageSigner {
    key: SigningKey,
}

/// The usage key as the audit log's checkpoint signer (checkpoint
/// messages carry their own domain prefix).
pub struct CheckpointKey(SigningKey);

impl bubble_audit::CheckpointSigner for CheckpointKey {
    fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }
    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// Canonical bytes of a usage record.
pub fn canonical_json(u: &pb::Usage) -> Vec<u8> {
    serde_json::json!({
        "bubble_id": u.bubble_id,
        "owner": u.owner,
        "vcpu_us": u.vcpu_us,
        "memory_mib_seconds": u.memory_mib_seconds,
        "calls": u.calls,
        "bytes_in": u.bytes_in,
        "bytes_out": u.bytes_out,
        "from_ms": u.from_ms,
        "to_ms": u.to_ms,
    })
    .to_string()
    .into_bytes()
}

impl UsageSigner {
    /// Loads the 32-byte key seed at `path`, or creates it (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, String> {
        let err = |e: std::io::Error| format!("usage key {}: {e}", path.display());
        if path.exists() {
            let bytes = Zeroizing::new(std::fs::read(path).map_err(err)?);
            let seed: &[u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| format!("usage key {}: expected 32 bytes", path.display()))?;
            return Ok(Self {
                key: SigningKey::from_bytes(seed),
            });
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|e| format!("randomness: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(seed.as_slice()).map_err(err)?;
        f.sync_all().map_err(err)?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The same key, to sign audit checkpoints.
    pub fn checkpoint_signer(&self) -> CheckpointKey {
        CheckpointKey(self.key.clone())
    }

    /// The public key that verifies this broker's reports.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a usage record.
    pub fn sign(&self, usage: pb::Usage) -> pb::UsageReport {
        let signed_json = canonical_json(&usage);
        let signature = self.key.sign(&signed_json).to_bytes().to_vec();
        pb::UsageReport {
            usage: Some(usage),
            signed_json,
            signature,
            broker_public_key: self.public_key().to_vec(),
        }
    }
}

/// Checks a report's signature under `public_key` and that its JSON matches
/// its structured usage.
pub fn verify(report: &pb::UsageReport, public_key: &[u8; 32]) -> Result<(), String> {
    let vk = VerifyingKey::from_bytes(public_key).map_err(|_| "bad public key".to_string())?;
    let sig = ed25519_dalek::Signature::from_slice(&report.signature)
        .map_err(|_| "signature has the wrong length".to_string())?;
    vk.verify(&report.signed_json, &sig)
        .map_err(|_| "signature does not verify".to_string())?;
    let usage = report.usage.as_ref().ok_or("report has no usage")?;
    if canonical_json(usage) != report.signed_json {
        return Err("signed JSON does not match the usage fields".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_verifies_and_detects_tampering() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let s = UsageSigner::load_or_create(&p).unwrap();
        let again = UsageSigner::load_or_create(&p).unwrap();
        assert_eq!(s.public_key(), again.public_key());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut r = s.sign(pb::Usage {
            bubble_id: "b-1".into(),
            calls: 3,
            ..Default::default()
        });
        verify(&r, &s.public_key()).unwrap();
        r.usage.as_mut().unwrap().calls = 4;
        assert!(verify(&r, &s.public_key()).is_err());
        r.usage.as_mut().unwrap().calls = 3;
        r.signature[0] ^= 1;
        assert!(verify(&r, &s.public_key()).is_err());
    }
}
