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

pub mod cli;
pub mod measure;
pub mod policy;
pub mod report;
pub mod sim;
pub mod verify;

pub use policy::Policy;
pub use report::{Report, ReportError, Tcb};
pub use sim::{CertChain, ReportRequest, SimPsp, SnpBackend, TeeBackend, TeeError};
pub use verify::{verify_amd, verify_sim, Product, Verified, VerifyError};
