//! The guest contract, re-exported from the `bubble-abi` crate (which the
//! guest shim uses too, so host and guest cannot disagree on a constant):
//! messages, error codes, CALL flags, limits and op payloads. How
//! messages travel (the doorbell and the shared mailbox pages) lives in
//! [`crate::transport`]; on SEV-SNP only the transport changes (VMGEXIT
//! through the GHCB, shared pages), never these messages.
//!
//! Every field the guest writes is untrusted: [`Header::decode`] and the
//! payload decoders check magic, version, type and bounds, and never panic.

pub use bubble_abi::*;
