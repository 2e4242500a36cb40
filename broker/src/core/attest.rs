//! Attestation: the bubble's keys and REPORT_DATA from inside it, the
//! launch measurement from its VMM, and a report from the TEE backend.

use std::sync::Arc;

use super::Broker;
use crate::config;
use crate::error::{invalid, BrokerError};
use crate::store::registry::BubbleRecord;

/// What a bubble answers to `attest`: its public keys and the REPORT_DATA
/// it asks the PSP to sign.
#[derive(Clone, Copy, Debug)]
pub struct GuestBinding {
    /// X25519 HPKE public key.
    pub kem_pk: [u8; 32],
    /// Ed25519 public key.
    pub sig_pk: [u8; 32],
    /// REPORT_DATA computed inside the bubble.
    pub report_data: [u8; 64],
    /// Digest of the loaded portions.
    pub portions_digest: [u8; 48],
    /// SHA-256 of the security policy (zero: default).
    pub policy_digest: [u8; 32],
}

/// An attestation of one bubble, ready to render.
#[derive(Clone, Debug)]
pub struct AttestationBundle {
    /// The bubble.
    pub bubble_id: String,
    /// The signed report.
    pub report: Vec<u8>,
    /// TEE backend name (`sim` here).
    pub tee: String,
    /// The certificate chain (DER): ARK, ASK, VCEK.
    pub chain: bubble_attestation::CertChain,
    /// The bubble's keys and binding.
    pub binding: GuestBinding,
    /// Portions loaded, in order: (name, SHA-384 of the module).
    pub portions: Vec<(String, Vec<u8>)>,
}

impl Broker {
    /// Asks one of `parent`'s bubbles for its public keys and the
    /// REPORT_DATA binding `nonce` to them.
    pub async fn attest_binding(
        self: &Arc<Self>,
        parent: &str,
        bubble_id: &str,
        nonce: &[u8],
    ) -> Result<(BubbleRecord, GuestBinding), BrokerError> {
        if !(16..=64).contains(&nonce.len()) {
            return Err(invalid("nonce", "must be 16 to 64 bytes"));
        }
        let deadline = config::DEFAULT_CALL_DEADLINE;
        let permit = self.permit_owned(parent, bubble_id, deadline).await?;
        let rec = permit.rec.clone();
        let (out, _) = self.invoke(permit, "attest", nonce, deadline).await?;
        if out.len() != 32 + 32 + 64 + 48 + 32 {
            return Err(BrokerError::GuestRejected(
                "the bubble returned a malformed attestation binding".into(),
            ));
        }
        let mut b = GuestBinding {
            kem_pk: [0; 32],
            sig_pk: [0; 32],
            report_data: [0; 64],
            portions_digest: [0; 48],
            policy_digest: [0; 32],
        };
        b.kem_pk.copy_from_slice(&out[..32]);
        b.sig_pk.copy_from_slice(&out[32..64]);
        b.report_data.copy_from_slice(&out[64..128]);
        b.portions_digest.copy_from_slice(&out[128..176]);
        b.policy_digest.copy_from_slice(&out[176..]);
        Ok((rec, b))
    }

    /// The launch measurement of a running bubble: the SNP launch digest
    /// its VMM computed over the pages it placed when it loaded the guest
    /// (for a restored bubble, the launch digest its snapshot carried). The
    /// broker does not compute it.
    pub async fn measurement(&self, bubble_id: &str) -> Result<[u8; 48], BrokerError> {
        let live = self
            .table
            .live_of(bubble_id)
            .ok_or_else(|| BrokerError::Unavailable("the bubble is not running".into()))?;
        live.vmm.launch_measurement().await
    }

    /// An attestation report of one of `parent`'s bubbles for `nonce`.
    pub async fn attestation(
        self: &Arc<Self>,
        parent: &str,
        bubble_id: &str,
        nonce: &[u8],
    ) -> Result<AttestationBundle, BrokerError> {
        use bubble_attestation::TeeBackend;
        let (rec, binding) = self.attest_binding(parent, bubble_id, nonce).await?;
        let measurement = self.measurement(&rec.id).await?;
        let report = self
            .psp
            .report(&bubble_attestation::ReportRequest {
                report_data: binding.report_data,
                measurement,
                host_data: bubble_attestation::host_data(&rec.id, &rec.owner),
            })
            .map_err(|e| BrokerError::GuestInternal(e.to_string()))?;
        let chain = self
            .psp
            .cert_chain()
            .map_err(|e| BrokerError::GuestInternal(e.to_string()))?;
        let portions = self
            .table
            .get(&rec.id)
            .map(|r| r.portions)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, h)| (name, hex::decode(h).unwrap_or_default()))
            .collect();
        Ok(AttestationBundle {
            bubble_id: rec.id,
            report,
            tee: self.psp.name().to_string(),
            chain,
            binding,
            portions,
        })
    }
}
