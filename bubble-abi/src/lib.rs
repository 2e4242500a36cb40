//! The guest contract of a bubble, in one place: what the guest shim, the
//! VMM, the broker and the client library all agree on.
//!
//! - [`msg`]: the 64-byte message [`Header`], the [`MsgType`]s, the boot
//!   information page ([`BootInfo`]), ERROR_REPLY and LOG/PANIC payloads.
//! - [`ErrorCode`]: the codes of an ERROR_REPLY (`#[repr(u16)]`).
//! - [`call`]: the CALL payload, with its flags ([`CallFlags`]: SIGN, SEAL)
//!   carried as a byte, never as a prefix of the op name.
//! - [`ops`]: the built-in ops and their payloads (portion calls, signed
//!   results, the attestation binding, provisioning, loading a portion,
//!   HMAC), each with an encoder and a decoder.
//! - [`policy`]: the security-policy wire format and its digest.
//! - [`replay`]: the replay window of sealed inputs.
//! - [`awaits`]: AWAITING and RESUME, for portions that wait for an event.
//! - [`rate`]: the credential rate limit (a token bucket on host time).
//!
//! `docs/guest-abi.md` is the prose description; a test of this crate
//! checks that its tables match these constants.
//!
//! Every decoder takes untrusted bytes: it checks every length and field,
//! returns an [`AbiError`] on anything it does not accept, and never
//! panics (the fuzz targets in `bubble-abi/fuzz` hold it to that).

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod awaits;
pub mod call;
mod codes;
mod error;
pub mod msg;
pub mod ops;
#[cfg(feature = "alloc")]
pub mod policy;
pub mod rate;
#[cfg(feature = "alloc")]
pub mod replay;
pub mod session;
mod wire;

#[cfg(test)]
mod doc_check;

pub use awaits::{Awaiting, Resume, MAX_AWAIT_KEY_LEN, MAX_AWAIT_TIMEOUT_MS, OP_RESUME};
pub use call::{Call, CallFlags, Signing};
pub use codes::{code, ErrorCode};
pub use error::AbiError;
pub use msg::{decode_error, decode_text, encode_error, BootInfo, Header, MsgType};
#[cfg(feature = "alloc")]
pub use policy::SecurityPolicy;
pub use rate::{CredentialRate, TokenBucket};
#[cfg(feature = "alloc")]
pub use replay::{ReplayWindow, REPLAY_WINDOW};
pub use session::{SeqWindow, SessionCall, OP_PORTION_SESSION};

/// ABI version carried in every header and in the boot information.
/// Version 2 moved SIGN/SEAL from a `sign:` op prefix to the CALL flags.
pub const ABI_VERSION: u16 = 2;
/// Header magic, "BBL1" little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BBL1");
/// Size of the message header.
pub const HEADER_LEN: usize = 64;
/// Longest op name in a CALL, in bytes (the broker refuses longer ones).
pub const MAX_OP_LEN: usize = 64;
/// Longest portion or credential name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest bubble id in a signed CALL or a provisioning frame, in bytes.
pub const MAX_BUBBLE_ID_LEN: usize = 255;
/// Longest LOG, PANIC or ERROR_REPLY text the host accepts, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;
/// Size of an X25519 public key (`seal_to`, the bubble's KEM key).
pub const PUBLIC_KEY_LEN: usize = 32;
/// Size of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Shortest attestation nonce.
pub const MIN_NONCE_LEN: usize = 16;
/// Longest attestation nonce.
pub const MAX_NONCE_LEN: usize = 64;
/// Size of the portions digest (SHA-384 chain).
pub const PORTIONS_DIGEST_LEN: usize = 48;
/// Size of the policy digest (SHA-256).
pub const POLICY_DIGEST_LEN: usize = 32;
/// Most bytes a portion-call frame adds to the caller's input: the portion
/// and function names with their lengths.
pub const MAX_PORTION_FRAME_OVERHEAD: usize = 2 + MAX_NAME_LEN + MAX_OP_LEN;
/// Most bytes a CALL payload adds to the caller's input: flags, op,
/// signing context, and a portion-call frame. The mailbox holds this much
/// more than the payload limit.
pub const MAX_CALL_OVERHEAD: usize =
    2 + MAX_OP_LEN + 1 + MAX_BUBBLE_ID_LEN + PUBLIC_KEY_LEN + MAX_PORTION_FRAME_OVERHEAD;

/// Guest-physical address of the boot information page.
pub const BOOT_INFO_GPA: u64 = 0xA000;
/// Magic of the boot information page ("BUBBLEB1").
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"BUBBLEB1");
/// Size of the encoded boot information.
pub const BOOT_INFO_LEN: usize = 64;

/// Whether `s` is a valid op, portion or credential name: 1 to `max`
/// bytes of `A-Z a-z 0-9 . _ -`.
pub fn is_valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}
