//! Requests: broker → VMM.

use super::frame::{head, Kind, HEAD_LEN, SNAPSHOT_PIECE};
use super::wire::{empty, Cursor, DecodeError, EncodeError};

/// A CALL: the guest's CALL payload ([`bubble_abi::Call`]: flags, op,
/// signing context, input), run within `deadline_ms` (0: the VMM's
/// default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call<'a> {
    /// Deadline, ms (0: default).
    pub deadline_ms: u32,
    /// What the guest runs.
    pub call: bubble_abi::Call<'a>,
}

/// A request, borrowing its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Identify the bubble; answered with `StatusOk` or `Error`.
    Hello {
        /// The bubble the broker expects.
        bubble_id: &'a str,
    },
    /// Status; answered with `StatusOk`.
    Status,
    /// A call; answered with `CallOk`, `CallErr` or `Error`.
    Call(Call<'a>),
    /// Stop; answered with `ShutdownOk`.
    Shutdown,
    /// First frame to a spare VMM: its arguments (no answer).
    Configure {
        /// The VMM's arguments.
        args: Vec<&'a str>,
    },
    /// Capture the VM; answered with `Snapshot` or `Error`.
    Suspend,
    /// Restore mode: a snapshot of `len` bytes follows in `RestoreData`
    /// frames with the same id and is streamed into guest memory (never
    /// held in a buffer); answered with `RestoreOk` or `Error`.
    Restore {
        /// Snapshot length.
        len: u64,
    },
    /// Restore mode: the next piece (1..=[`SNAPSHOT_PIECE`] bytes) of the
    /// snapshot a `Restore` announced; no answer of its own.
    RestoreData {
        /// The bytes.
        bytes: &'a [u8],
    },
    /// Restore mode: fault in these page runs (guest address, pages);
    /// answered with `PrefaultOk` or `Error`.
    Prefault {
        /// The runs.
        runs: Vec<(u64, u64)>,
    },
    /// Restore mode, pages already in guest memory: the vCPU state;
    /// answered with `RestoreOk` or `Error`.
    RestoreState {
        /// Encoded vCPU state.
        state: &'a [u8],
    },
    /// The launch measurement; answered with `MeasurementOk` or `Error`.
    Measurement,
}

impl<'a> Request<'a> {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Request::Hello { .. } => Kind::Hello,
            Request::Status => Kind::Status,
            Request::Call(_) => Kind::Call,
            Request::Shutdown => Kind::Shutdown,
            Request::Configure { .. } => Kind::Configure,
            Request::Suspend => Kind::Suspend,
            Request::Restore { .. } => Kind::Restore,
            Request::RestoreData { .. } => Kind::RestoreData,
            Request::Prefault { .. } => Kind::Prefault,
            Request::RestoreState { .. } => Kind::RestoreState,
            Request::Measurement => Kind::Measurement,
        }
    }

    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Request::Restore { len } => out.extend_from_slice(&len.to_le_bytes()),
            Request::RestoreData { bytes } => {
                if bytes.is_empty() || bytes.len() > SNAPSHOT_PIECE {
                    return Err(EncodeError::TooLarge {
                        what: "RESTORE_DATA piece",
                        len: bytes.len(),
                    });
                }
                out.extend_from_slice(bytes)
            }
            Request::Hello { bubble_id } => out.extend_from_slice(bubble_id.as_bytes()),
            Request::Call(c) => {
                out.extend_from_slice(&c.deadline_ms.to_le_bytes());
                let at = out.len();
                out.resize(at + c.call.encoded_len(), 0);
                let n = c
                    .call
                    .encode_into(&mut out[at..])
                    .map_err(EncodeError::Call)?;
                out.truncate(at + n);
            }
            Request::Configure { args } => {
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        out.push(0);
                    }
                    out.extend_from_slice(a.as_bytes());
                }
            }
            Request::Prefault { runs } => encode_runs_into(runs, out)?,
            Request::RestoreState { state } => out.extend_from_slice(state),
            Request::Status | Request::Shutdown | Request::Suspend | Request::Measurement => {}
        }
        Ok(())
    }

    /// The whole frame with request id `id`: head and body in one buffer.
    pub fn frame(&self, id: u64) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::with_capacity(HEAD_LEN + 64);
        v.extend_from_slice(&[0u8; HEAD_LEN]);
        self.encode_body(&mut v)?;
        let h = head(self.kind() as u8, id, v.len() - HEAD_LEN)?;
        v[..HEAD_LEN].copy_from_slice(&h);
        Ok(v)
    }

    /// Decodes a request body of frame kind `kind`.
    pub fn decode(kind: u8, body: &'a [u8]) -> Result<Self, DecodeError> {
        let k = Kind::from_u8(kind).ok_or(DecodeError::UnexpectedKind(kind))?;
        Ok(match k {
            Kind::Hello => Request::Hello {
                bubble_id: Cursor::new(body, "HELLO").str(body.len())?,
            },
            Kind::Status => {
                empty(body, "STATUS")?;
                Request::Status
            }
            Kind::Call => {
                let mut c = Cursor::new(body, "CALL");
                let deadline_ms = c.u32()?;
                let call = bubble_abi::Call::decode(c.rest()).map_err(DecodeError::Call)?;
                Request::Call(Call { deadline_ms, call })
            }
            Kind::Shutdown => {
                empty(body, "SHUTDOWN")?;
                Request::Shutdown
            }
            Kind::Configure => Request::Configure {
                args: Cursor::new(body, "CONFIGURE")
                    .str(body.len())?
                    .split('\0')
                    .collect(),
            },
            Kind::Suspend => {
                empty(body, "SUSPEND")?;
                Request::Suspend
            }
            Kind::Restore => {
                let mut c = Cursor::new(body, "RESTORE");
                let len = c.u64()?;
                c.end()?;
                Request::Restore { len }
            }
            Kind::RestoreData => {
                if body.is_empty() || body.len() > SNAPSHOT_PIECE {
                    return Err(DecodeError::FrameLength(body.len()));
                }
                Request::RestoreData { bytes: body }
            }
            Kind::Prefault => Request::Prefault {
                runs: decode_runs(body)?,
            },
            Kind::RestoreState => Request::RestoreState { state: body },
            Kind::Measurement => {
                empty(body, "MEASUREMENT")?;
                Request::Measurement
            }
            _ => return Err(DecodeError::UnexpectedKind(kind)),
        })
    }
}

/// Appends page runs: `[n u32][(gpa u64, pages u64)*]`.
fn encode_runs_into(runs: &[(u64, u64)], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let n = u32::try_from(runs.len()).map_err(|_| EncodeError::TooLarge {
        what: "page runs",
        len: runs.len(),
    })?;
    out.reserve(4 + runs.len() * 16);
    out.extend_from_slice(&n.to_le_bytes());
    for (g, p) in runs {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&p.to_le_bytes());
    }
    Ok(())
}

/// Encodes page runs for a PREFAULT body (see [`Request::Prefault`]).
pub fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    // More than 2^32 runs cannot exist in guest memory below 2^44 bytes;
    // encode_runs_into refuses them, leaving an empty (invalid) body.
    let _ = encode_runs_into(runs, &mut v);
    v
}

/// Decodes a PREFAULT body's page runs: the structure only (the VMM
/// checks them against its memory, see `snapshot::check_runs`).
pub fn decode_runs(b: &[u8]) -> Result<Vec<(u64, u64)>, DecodeError> {
    let mut c = Cursor::new(b, "PREFAULT");
    let n = c.u32()? as usize;
    // Checked before allocating: a hostile count cannot reserve memory.
    if b.len() - 4 != n.saturating_mul(16) {
        return Err(DecodeError::Short { what: "PREFAULT" });
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push((c.u64()?, c.u64()?));
    }
    c.end()?;
    Ok(out)
}
