//! Typed commands the core executes and the results it returns; `crate::api`
//! builds them from validated gRPC requests.

use std::time::Duration;

use crate::store::registry::{IdleRule, PortionPolicy};
use crate::vmm::ImageSpec;

/// Create a bubble for a parent.
#[derive(Clone, Debug)]
pub struct NewBubble {
    /// The parent's idempotency key (empty: none).
    pub client_request_id: String,
    /// Guest memory, MiB (already range-checked).
    pub memory_mib: u32,
    /// The image to boot.
    pub image: ImageSpec,
    /// Idle policy.
    pub idle: IdleRule,
    /// Security policy for portions.
    pub policy: PortionPolicy,
}

/// Take a bubble from a warm pool.
#[derive(Clone, Debug)]
pub struct Attach {
    /// The pool profile.
    pub profile: String,
    /// The parent's idempotency key (empty: none).
    pub client_request_id: String,
    /// Idle policy (`None`: the profile's).
    pub idle: Option<IdleRule>,
    /// How long to wait for a pooled bubble before booting one.
    pub wait: Duration,
    /// The security policy, installed before the bubble is handed over.
    pub policy: PortionPolicy,
}

/// What a call runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A built-in op of the guest.
    Builtin,
    /// Function `op` of the named portion.
    Portion(String),
    /// Function `op` of the named portion, with the input (the call's
    /// `input` bytes) a sealed box the bubble opens: HPKE to the bubble's
    /// key, AAD binding bubble id, portion, function and `seq`.
    SealedPortion {
        /// The portion.
        portion: String,
        /// The per-call sequence number (nonce) the bubble's replay window
        /// checks.
        seq: u64,
    },
    /// Function `op` of the named portion, with the input (the call's
    /// `input` bytes) AES-256-GCM ciphertext under a sealed session's key,
    /// which only the bubble holds; `setup` is the session's sealed key
    /// (empty once the bubble holds it).
    SessionPortion {
        /// The portion.
        portion: String,
        /// The session.
        session_id: u64,
        /// The call's sequence number in the session.
        seq: u64,
        /// The session's HPKE setup, or empty.
        setup: Vec<u8>,
    },
}

/// Run an op in a bubble.
#[derive(Clone, Debug)]
pub struct Call {
    /// The bubble.
    pub bubble_id: String,
    /// Op or function name (validated).
    pub op: String,
    /// What runs it.
    pub target: Target,
    /// Input bytes (at most the payload limit).
    pub input: Vec<u8>,
    /// The caller's deadline (`None`: the default, or the policy's for a
    /// portion).
    pub deadline: Option<Duration>,
    /// Sign the result inside the bubble.
    pub sign: bool,
    /// Seal the result to this X25519 key inside the bubble (implies sign).
    pub seal_to: Option<[u8; 32]>,
}

/// A call's result.
#[derive(Clone, Debug, Default)]
pub struct CallOutput {
    /// Output bytes (sealed if asked).
    pub output: Vec<u8>,
    /// Microseconds spent in the VMM.
    pub vmm_us: u64,
    /// The bubble's call counter and signature, for signed calls.
    pub signed: Option<(u64, Vec<u8>)>,
    /// When the broker handed the CALL to the VMM client, which writes
    /// its frame to the VMM's socket at once (monotonic; None where not
    /// recorded): the start `event_to_start` measures.
    pub started: Option<std::time::Instant>,
}

/// Hand a sealed credential to a bubble.
#[derive(Clone, Debug)]
pub struct Provision {
    /// The bubble.
    pub bubble_id: String,
    /// Credential name (validated).
    pub name: String,
    /// HPKE-sealed box (validated size).
    pub sealed: Vec<u8>,
}

/// Load a WebAssembly portion into a bubble.
#[derive(Clone, Debug)]
pub struct LoadPortion {
    /// The bubble.
    pub bubble_id: String,
    /// Portion name (validated).
    pub name: String,
    /// The module (validated size).
    pub module: Vec<u8>,
}

/// A portion as loaded.
#[derive(Clone, Debug)]
pub struct PortionLoaded {
    /// Digest over every loaded portion, from the bubble.
    pub portions_digest: Vec<u8>,
    /// SHA-384 of this module.
    pub module_sha384: Vec<u8>,
}

/// Freeze a bubble to the store.
pub struct Suspend {
    /// The bubble.
    pub bubble_id: String,
    /// The parent's key-encryption key (`None`: the broker's).
    pub kek: Option<bubble_keys::Kek>,
}

/// Resume a frozen bubble.
pub struct Restore {
    /// The bubble.
    pub bubble_id: String,
    /// The generation to import when this broker does not know the bubble
    /// (0: only a bubble this broker knows).
    pub generation: u64,
    /// The parent's key-encryption key (`None`: the broker's).
    pub kek: Option<bubble_keys::Kek>,
}

/// One page of a parent's bubbles.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// The records, oldest first.
    pub bubbles: Vec<crate::store::registry::BubbleRecord>,
    /// Token for the next page (empty: none).
    pub next: String,
}
