//! Replies: VMM → broker, answering a request with the request's id.

use std::borrow::Cow;

use super::failure::{FailureKind, FailureReason};
use super::frame::{write_frame, Kind, SNAPSHOT_PIECE};
use super::wire::{empty, Cursor, DecodeError};

/// The VMM's state, in a `StatusOk` reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Bubble id the VMM runs.
    pub bubble_id: String,
    /// Guest answered READY.
    pub ready: bool,
    /// Why the bubble died, if it did.
    pub failed: Option<FailureReason>,
    /// Boot time (VM creation to READY), µs.
    pub boot_us: u64,
    /// Time the vCPU spent in KVM_RUN, µs.
    pub vcpu_us: u64,
    /// VMM process id.
    pub pid: u32,
    /// Guest ABI version.
    pub abi_version: u16,
}

impl Status {
    /// `[ready u8][failure kind u8, 0: none][boot_us u64][vcpu_us u64]
    /// [pid u32][abi u16][id_len u16][id][failure detail]`.
    fn put(&self, v: &mut Vec<u8>) {
        // Bubble ids are short (the broker makes them); a longer one is
        // cut at a character boundary rather than mis-framed.
        let mut n = self.bubble_id.len().min(usize::from(u16::MAX));
        while !self.bubble_id.is_char_boundary(n) {
            n -= 1;
        }
        v.push(u8::from(self.ready));
        v.push(self.failed.as_ref().map_or(0, |f| f.kind as u8));
        v.extend_from_slice(&self.boot_us.to_le_bytes());
        v.extend_from_slice(&self.vcpu_us.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.abi_version.to_le_bytes());
        v.extend_from_slice(&(n as u16).to_le_bytes());
        v.extend_from_slice(&self.bubble_id.as_bytes()[..n]);
        if let Some(f) = &self.failed {
            v.extend_from_slice(f.detail.as_bytes());
        }
    }

    fn get(b: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(b, "STATUS_OK");
        let ready = c.u8()? != 0;
        let failed = c.u8()?;
        let boot_us = c.u64()?;
        let vcpu_us = c.u64()?;
        let pid = c.u32()?;
        let abi_version = c.u16()?;
        let n = c.u16()?;
        let bubble_id = c.str(usize::from(n))?.to_string();
        let failed = match failed {
            0 => {
                c.end()?;
                None
            }
            value => {
                let kind = FailureKind::from_code(value).ok_or(DecodeError::Code {
                    what: "failure kind",
                    value,
                })?;
                Some(FailureReason::new(kind, c.text()))
            }
        };
        Ok(Status {
            bubble_id,
            ready,
            failed,
            boot_us,
            vcpu_us,
            pid,
            abi_version,
        })
    }
}

/// Where a VMM's launch measurement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LaunchOrigin {
    /// This VMM loaded the bubble and measured the pages it placed.
    Measured = 1,
    /// This VMM restored the bubble; the digest is its launch's, carried
    /// in the authenticated snapshot.
    Restored = 2,
}

/// A `MeasurementOk` reply: the bubble's SNP launch digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchMeasurement {
    /// Where it comes from.
    pub origin: LaunchOrigin,
    /// The launch digest (MEASUREMENT of the bubble's reports).
    pub digest: [u8; 48],
}

impl LaunchMeasurement {
    /// `[origin u8][digest 48]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(49);
        v.push(self.origin as u8);
        v.extend_from_slice(&self.digest);
        v
    }

    /// Decodes a body (exactly 49 bytes).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Cursor::new(b, "MEASUREMENT_OK");
        let origin = match c.u8()? {
            1 => LaunchOrigin::Measured,
            2 => LaunchOrigin::Restored,
            value => {
                return Err(DecodeError::Code {
                    what: "measurement origin",
                    value,
                })
            }
        };
        let digest = c.array::<48>()?;
        c.end()?;
        Ok(LaunchMeasurement { origin, digest })
    }
}

/// Where a restoring VMM keeps guest memory (in its address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpan {
    /// Host address of guest-physical 0.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

/// Why a call failed, in a `CallErr` reply: `[kind u8][…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallErr {
    /// 1: the guest refused the request; the bubble is fine.
    /// `[1][guest code u16][text]`.
    Rejected {
        /// Guest ABI error code.
        code: u16,
        /// The guest's text.
        text: String,
    },
    /// 2: the guest overran the deadline and was stopped (the bubble
    /// failed with kind `Deadline`). `[2][text]`.
    Deadline(String),
    /// 3: the bubble is dead. `[3][failure kind u8][detail]`.
    Failed(FailureReason),
    /// 4: the request does not fit the mailbox; the bubble is fine.
    /// `[4][text]`.
    BadRequest(String),
    /// 5: not answered yet: a portion awaits the event `key` (a valid
    /// await key) for at most `timeout_ms`; the guest waits for a RESUME.
    /// `[5][timeout_ms u32][key]`.
    Awaiting {
        /// The await key.
        key: String,
        /// Timeout, ms.
        timeout_ms: u32,
    },
}

/// What was wrong with a request, in an `Error` reply: `[code u8][text]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The body did not decode.
    Malformed = 1,
    /// Unknown request, or one this mode does not serve.
    Unexpected = 2,
    /// HELLO named another bubble.
    WrongBubble = 3,
    /// The bubble has no guest (it failed).
    NoGuest = 4,
    /// The VMM does not know its launch measurement.
    NoMeasurement = 5,
    /// The snapshot could not be taken.
    Snapshot = 6,
    /// The snapshot could not be restored.
    Restore = 7,
}

impl ErrorCode {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::Unexpected,
            3 => ErrorCode::WrongBubble,
            4 => ErrorCode::NoGuest,
            5 => ErrorCode::NoMeasurement,
            6 => ErrorCode::Snapshot,
            7 => ErrorCode::Restore,
            _ => return None,
        })
    }
}

/// A reply, owning its body (large bodies are moved, never copied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The VMM's status.
    StatusOk(Status),
    /// A call's output.
    CallOk(Vec<u8>),
    /// A call failed.
    CallErr(CallErr),
    /// Shutdown acknowledged; the VMM exits.
    ShutdownOk,
    /// The request was refused (the bubble is unaffected).
    Error {
        /// What was wrong.
        code: ErrorCode,
        /// Human text.
        text: String,
    },
    /// The next piece (1..=[`SNAPSHOT_PIECE`] bytes) of the VM's snapshot
    /// `[state_len u32][state][n u32][(gpa u64, page)*]` (see
    /// `crate::snapshot`); more pieces or `SnapshotEnd` follow.
    Snapshot(Vec<u8>),
    /// The snapshot is complete: how many pieces and bytes were sent.
    SnapshotEnd {
        /// Pieces sent.
        pieces: u64,
        /// Bytes sent.
        len: u64,
    },
    /// Restored; the guest is ready. How long the VMM took, µs.
    RestoreOk {
        /// µs.
        took_us: u64,
    },
    /// Pages faulted in; where guest memory lies in the VMM (none if it
    /// cannot tell), for the broker to write pages into directly.
    PrefaultOk(Option<GuestSpan>),
    /// The launch measurement.
    MeasurementOk(LaunchMeasurement),
}

impl Reply {
    /// A refusal.
    pub fn error(code: ErrorCode, text: impl Into<String>) -> Self {
        Reply::Error {
            code,
            text: text.into(),
        }
    }

    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Reply::StatusOk(_) => Kind::StatusOk,
            Reply::CallOk(_) => Kind::CallOk,
            Reply::CallErr(_) => Kind::CallErr,
            Reply::ShutdownOk => Kind::ShutdownOk,
            Reply::Error { .. } => Kind::Error,
            Reply::Snapshot(_) => Kind::Snapshot,
            Reply::SnapshotEnd { .. } => Kind::SnapshotEnd,
            Reply::RestoreOk { .. } => Kind::RestoreOk,
            Reply::PrefaultOk(_) => Kind::PrefaultOk,
            Reply::MeasurementOk(_) => Kind::MeasurementOk,
        }
    }

    /// The body: borrowed for outputs and snapshots (no copy).
    pub fn body(&self) -> Cow<'_, [u8]> {
        let mut v = Vec::new();
        match self {
            Reply::CallOk(b) | Reply::Snapshot(b) => return Cow::Borrowed(b),
            Reply::StatusOk(s) => s.put(&mut v),
            Reply::CallErr(e) => match e {
                CallErr::Rejected { code, text } => {
                    v.push(1);
                    v.extend_from_slice(&code.to_le_bytes());
                    v.extend_from_slice(text.as_bytes());
                }
                CallErr::Deadline(text) => {
                    v.push(2);
                    v.extend_from_slice(text.as_bytes());
                }
                CallErr::Failed(r) => {
                    v.push(3);
                    r.put(&mut v);
                }
                CallErr::BadRequest(text) => {
                    v.push(4);
                    v.extend_from_slice(text.as_bytes());
                }
                CallErr::Awaiting { key, timeout_ms } => {
                    v.push(5);
                    v.extend_from_slice(&timeout_ms.to_le_bytes());
                    v.extend_from_slice(key.as_bytes());
                }
            },
            Reply::ShutdownOk => {}
            Reply::Error { code, text } => {
                v.push(*code as u8);
                v.extend_from_slice(text.as_bytes());
            }
            Reply::RestoreOk { took_us } => v.extend_from_slice(&took_us.to_le_bytes()),
            Reply::SnapshotEnd { pieces, len } => {
                v.extend_from_slice(&pieces.to_le_bytes());
                v.extend_from_slice(&len.to_le_bytes());
            }
            Reply::PrefaultOk(span) => {
                if let Some(s) = span {
                    v.extend_from_slice(&s.host.to_le_bytes());
                    v.extend_from_slice(&s.len.to_le_bytes());
                }
            }
            Reply::MeasurementOk(m) => v = m.encode(),
        }
        Cow::Owned(v)
    }

    /// Decodes a reply of frame kind `kind`, taking its body.
    pub fn decode(kind: u8, body: Vec<u8>) -> Result<Self, DecodeError> {
        let k = Kind::from_u8(kind).ok_or(DecodeError::UnexpectedKind(kind))?;
        Ok(match k {
            Kind::StatusOk => Reply::StatusOk(Status::get(&body)?),
            Kind::CallOk => Reply::CallOk(body),
            Kind::Snapshot => {
                if body.is_empty() || body.len() > SNAPSHOT_PIECE {
                    return Err(DecodeError::FrameLength(body.len()));
                }
                Reply::Snapshot(body)
            }
            Kind::SnapshotEnd => {
                let mut c = Cursor::new(&body, "SNAPSHOT_END");
                let (pieces, len) = (c.u64()?, c.u64()?);
                c.end()?;
                Reply::SnapshotEnd { pieces, len }
            }
            Kind::CallErr => {
                let mut c = Cursor::new(&body, "CALL_ERR");
                Reply::CallErr(match c.u8()? {
                    1 => CallErr::Rejected {
                        code: c.u16()?,
                        text: c.text(),
                    },
                    2 => CallErr::Deadline(c.text()),
                    3 => CallErr::Failed(FailureReason::get(&mut c)?),
                    4 => CallErr::BadRequest(c.text()),
                    5 => {
                        let timeout_ms = c.u32()?;
                        let key = c.text();
                        if !bubble_abi::awaits::is_valid_await_key(key.as_bytes())
                            || timeout_ms == 0
                            || timeout_ms > bubble_abi::MAX_AWAIT_TIMEOUT_MS
                        {
                            return Err(DecodeError::Code {
                                what: "await key or timeout",
                                value: 5,
                            });
                        }
                        CallErr::Awaiting { key, timeout_ms }
                    }
                    value => {
                        return Err(DecodeError::Code {
                            what: "call error kind",
                            value,
                        })
                    }
                })
            }
            Kind::ShutdownOk => {
                empty(&body, "SHUTDOWN_OK")?;
                Reply::ShutdownOk
            }
            Kind::Error => {
                let mut c = Cursor::new(&body, "ERROR");
                let value = c.u8()?;
                let code = ErrorCode::from_code(value).ok_or(DecodeError::Code {
                    what: "error code",
                    value,
                })?;
                Reply::Error {
                    code,
                    text: c.text(),
                }
            }
            Kind::RestoreOk => {
                let mut c = Cursor::new(&body, "RESTORE_OK");
                let took_us = c.u64()?;
                c.end()?;
                Reply::RestoreOk { took_us }
            }
            Kind::PrefaultOk => {
                let mut c = Cursor::new(&body, "PREFAULT_OK");
                let span = if body.is_empty() {
                    None
                } else {
                    Some(GuestSpan {
                        host: c.u64()?,
                        len: c.u64()?,
                    })
                };
                c.end()?;
                Reply::PrefaultOk(span)
            }
            Kind::MeasurementOk => Reply::MeasurementOk(LaunchMeasurement::decode(&body)?),
            _ => return Err(DecodeError::UnexpectedKind(kind)),
        })
    }
}

impl Reply {
    /// Writes the reply to request `id`.
    pub fn write_to(&self, id: u64, w: &mut impl std::io::Write) -> std::io::Result<()> {
        write_frame(w, self.kind(), id, &self.body())
    }
}
