//! Errors of the broker's VMM client ([`crate::VmmClient`]): talking to a
//! VMM process, and of one call.

use std::time::Duration;

use bubble_vmm::control::{EncodeError, ErrorCode, FailureKind, FailureReason};

use crate::exit::VmmExit;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The process could not be started.
    #[error("cannot start the VMM process: {0}")]
    Spawn(String),
    /// The socket could not be reached.
    #[error("cannot reach the VMM at {path}: {detail}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        detail: String,
    },
    /// The VMM runs another bubble or spoke out of protocol.
    #[error("VMM protocol: {0}")]
    Protocol(String),
    /// The request cannot be put on the wire (e.g. a snapshot over the
    /// frame limit); nothing was sent.
    #[error("cannot encode the request: {0}")]
    Encode(EncodeError),
    /// The VMM refused the request (an `ERROR` reply); the bubble is fine.
    #[error("VMM refused the request: {text}")]
    Refused {
        /// What was wrong.
        code: ErrorCode,
        /// The VMM's text.
        text: String,
    },
    /// The VMM is gone.
    #[error("VMM connection closed")]
    Closed,
    /// Waiting timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The bubble failed.
    #[error("{0}")]
    Failed(FailureReason),
    /// A snapshot to restore is malformed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VMM has no launch measurement to give (its text says why).
    #[error("no launch measurement: {0}")]
    NoMeasurement(String),
    /// The process listening on a VMM's socket runs as another uid than
    /// the VMM was given: not the VMM (or not jailed as asked).
    #[error("the VMM socket's peer runs as uid {got}, not {want}")]
    PeerUid {
        /// The peer's uid (`SO_PEERCRED`).
        got: u32,
        /// The uid the VMM was given.
        want: u32,
    },
    /// Every uid of `[jail] uid_range` is taken by a live VMM.
    #[error("no free uid left in the jail's uid range")]
    NoUid,
    /// The VMM process ended (how, when the broker can tell).
    #[error("{0}")]
    Exited(VmmExit),
}

impl VmmError {
    /// The failure this error stands for when it ends a bubble.
    pub fn failure_reason(&self) -> FailureReason {
        let kind = match self {
            VmmError::Failed(r) => return r.clone(),
            VmmError::Exited(e) => return e.reason(),
            VmmError::Spawn(_)
            | VmmError::Connect { .. }
            | VmmError::PeerUid { .. }
            | VmmError::NoUid => FailureKind::SpawnFailed,
            VmmError::Closed => FailureKind::VmmExited,
            VmmError::Protocol(_) | VmmError::Refused { .. } | VmmError::Encode(_) => {
                FailureKind::ControlProtocol
            }
            VmmError::Snapshot(_) => FailureKind::Restore,
            VmmError::Timeout(_) | VmmError::NoMeasurement(_) => FailureKind::Internal,
        };
        FailureReason::new(kind, self.to_string())
    }
}

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest refused the request (ABI error code, text); the bubble is
    /// fine. Codes: [`bubble_vmm::abi::code`].
    #[error("{1} (code {0})")]
    Guest(u16, String),
    /// The request could not be delivered (too large for the mailbox).
    #[error("{0}")]
    BadRequest(String),
    /// The VMM refused the request (an `ERROR` reply: it did not decode,
    /// or the VMM cannot serve it now); the guest never saw it and the
    /// bubble is fine.
    #[error("VMM refused the call: {text}")]
    Refused {
        /// What was wrong.
        code: ErrorCode,
        /// The VMM's text.
        text: String,
    },
    /// The guest overran the deadline; the VMM stopped it.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The bubble died, or its VMM did not answer.
    #[error("{0}")]
    Failed(FailureReason),
    /// Not answered yet: a portion awaits the event `key` (at most
    /// `timeout_ms`); the guest waits for a RESUME (op `resume`).
    #[error("a portion awaits the event {key:?} ({timeout_ms} ms)")]
    Awaiting {
        /// The await key (checked by the decoder).
        key: String,
        /// Timeout, ms.
        timeout_ms: u32,
    },
}
