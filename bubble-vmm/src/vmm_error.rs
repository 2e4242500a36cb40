//! Errors of the broker's VMM client ([`crate::client`]): talking to a
//! VMM process, and of one call.

use std::time::Duration;

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
    /// The VMM is gone.
    #[error("VMM connection closed")]
    Closed,
    /// Waiting timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The bubble failed.
    #[error("{0}")]
    Failed(String),
    /// A snapshot to restore is malformed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VMM has no launch measurement to give (its text says why).
    #[error("no launch measurement: {0}")]
    NoMeasurement(String),
    /// The VMM process ended (how, when the broker can tell).
    #[error("{0}")]
    Exited(VmmExit),
}

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest refused the request (ABI error code, text); the bubble is
    /// fine. Codes: [`crate::abi::code`].
    #[error("{1} (code {0})")]
    Guest(u16, String),
    /// The request could not be delivered (too large for the mailbox).
    #[error("{0}")]
    BadRequest(String),
    /// The guest overran the deadline; the VMM stopped it.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The bubble died.
    #[error("{0}")]
    Failed(String),
}
