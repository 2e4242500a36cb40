//! Attestation for bubbles: the AMD SEV-SNP `ATTESTATION_REPORT` format,
//! an offline verifier (signature, VCEK → ASK → ARK chain, VCEK extensions
//! against the report) with an appraisal [`Policy`], TEE backends (the
//! simulated virtual PSP, clearly marked, and the real `snp` one), and the
//! SNP launch measurement.
//!
//! REPORT_DATA of a bubble binds the verifier's nonce, the loaded portions,
//! the security policy and the bubble's public keys:
//! `bubble_keys::report_data(nonce ‖ portions_digest ‖ policy_digest, kem_pk, sig_pk)`
//! (see `docs/attestation.md`).

#![forbid(unsafe_code)]

pub mod amd;
pub mod certs;
pub mod chain_error;
pub mod cli;
pub mod expect;
pub mod extended;
pub mod measure;
pub mod policy;
pub mod product;
pub mod report;
pub mod sim;
pub mod verify;

pub use expect::{host_data, SecurityPolicy, HOST_DATA_DOMAIN};
pub use measure::{
    launch_digest, vmsa_page, PageInfo, PageType, PageUpdate, VmsaSegment, VmsaState,
};
pub use policy::Policy;
pub use report::{Report, ReportError, SigningKey, Tcb};
pub use sim::{CertChain, ReportRequest, SimLaunch, SimPsp, SnpBackend, TeeBackend, TeeError};
pub use verify::{verify_amd, verify_sim, verify_with_roots, Product, Verified, VerifyError};

/// Domain separator of the REPORT_DATA binding.
pub const REPORT_DATA_DOMAIN: &[u8] = b"bubble-v1";

/// REPORT_DATA binding of a nonce and a bubble's public keys:
/// `SHA-512("bubble-v1" ‖ u32 LE len(nonce) ‖ nonce ‖ kem_pk ‖ sig_pk)`.
///
/// The length prefix keeps the encoding unambiguous for variable-length
/// nonces. This is the same function as `bubble_keys::report_data` (a test
/// checks they agree); bubbles pass `nonce ‖ portions_digest ‖
/// policy_digest` as `nonce` (see `docs/attestation.md`).
pub fn report_data_binding(nonce: &[u8], kem_pk: &[u8; 32], sig_pk: &[u8; 32]) -> [u8; 64] {
    use sha2::{Digest, Sha512};
    let len = u32::try_from(nonce.len()).unwrap_or(u32::MAX);
    let mut h = Sha512::new();
    h.update(REPORT_DATA_DOMAIN);
    h.update(len.to_le_bytes());
    h.update(nonce);
    h.update(kem_pk);
    h.update(sig_pk);
    h.finalize().into()
}
