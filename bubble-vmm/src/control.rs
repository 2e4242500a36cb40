//! Control protocol between the broker and a VMM process, over the bubble's
//! Unix socket.
//!
//! A frame is `[len u32 LE][kind u8][id u64 LE][body]`, where `len` counts
//! kind, id and body and is at most [`MAX_FRAME`]. Requests carry an id
//! chosen by the broker; the answer carries the same id. Events from the
//! VMM carry id 0.
//!
//! | kind | direction | body |
//! |------|-----------|------|
//! | `HELLO` 0x01 | broker → VMM | expected bubble id (UTF-8) |
//! | `STATUS` 0x02 | broker → VMM | empty |
//! | `CALL` 0x03 | broker → VMM | `[deadline_ms u32][guest CALL payload]` ([`bubble_abi::Call`]: flags, op, signing, input) |
//! | `SHUTDOWN` 0x04 | broker → VMM | empty |
//! | `CONFIGURE` 0x05 | broker → spare VMM | its arguments, NUL-separated (first frame only) |
//! | `SUSPEND` 0x06 | broker → VMM | empty (answer: `SNAPSHOT`) |
//! | `RESTORE` 0x07 | broker → VMM (restore mode) | a snapshot, streamed into guest memory |
//! | `PREFAULT` 0x08 | broker → VMM (restore mode) | page runs to fault in (zeroes only) |
//! | `RESTORE_STATE` 0x09 | broker → VMM (restore mode) | vCPU state; the pages are already in guest memory |
//! | `MEASUREMENT` 0x0A | broker → VMM | empty (answer: `MEASUREMENT_OK`, or `ERROR` when the VMM does not know it) |
//! | `MEASUREMENT_OK` 0x8A | VMM → broker | [`LaunchMeasurement`]: `[origin u8][digest 48]` |
//! | `SNAPSHOT` 0x86 | VMM → broker | `[state_len u32][state][n u32][(gpa u64, page)*]` |
//! | `RESTORE_OK` 0x87 | VMM → broker | `[µs u64]` the VMM took |
//! | `PREFAULT_OK` 0x88 | VMM → broker | `[host address u64][length u64]` of guest memory |
//! | `STATUS_OK` 0x81 | VMM → broker | [`Status`] |
//! | `CALL_OK` 0x82 | VMM → broker | output |
//! | `CALL_ERR` 0x83 | VMM → broker | `[kind u8][text]` (see [`CallErrKind`]); for `Rejected`, `[kind][guest code u16 LE][text]` |
//! | `SHUTDOWN_OK` 0x84 | VMM → broker | empty |
//! | `ERROR` 0x85 | VMM → broker | text (bad request) |
//! | `EV_READY` 0xA1 | VMM → broker | `[boot_us u64]` |
//! | `EV_LOG` 0xA2 | VMM → broker | text |
//! | `EV_FAILED` 0xA3 | VMM → broker | text |

use std::io::{self, Read, Write};

/// Largest frame: snapshots are the largest messages (calls are bounded by
/// the payload limit), so a bubble can be suspended with up to ~1 GiB of
/// touched memory.
pub const MAX_FRAME: usize = 1 << 30;

/// Length prefix, kind and id: the bytes before a frame's body.
pub const HEAD_LEN: usize = 13;

/// Bodies up to this size are copied behind their head and sent in one
/// write; larger ones are sent as they are, after the head.
pub const COALESCE_MAX: usize = 64 << 10;

/// Frame kinds.
pub mod kind {
    /// Hello (identify the bubble).
    pub const HELLO: u8 = 0x01;
    /// Status request.
    pub const STATUS: u8 = 0x02;
    /// Call request.
    pub const CALL: u8 = 0x03;
    /// Shutdown request.
    pub const SHUTDOWN: u8 = 0x04;
    /// Configure a spare VMM (body: its arguments, NUL-separated).
    pub const CONFIGURE: u8 = 0x05;
    /// Capture the VM (answer: SNAPSHOT).
    pub const SUSPEND: u8 = 0x06;
    /// Rebuild the VM from a snapshot (restore mode; answer: RESTORE_OK).
    pub const RESTORE: u8 = 0x07;
    /// Fault in guest pages ahead of RESTORE (restore mode; body: page
    /// runs, see [`crate::snapshot::encode_runs`]; answer: PREFAULT_OK).
    /// Only zeroes are written: no guest byte travels with it.
    pub const PREFAULT: u8 = 0x08;
    /// Pages faulted in; body: `[host address u64][length u64]` of guest
    /// memory in the VMM, for the broker to write verified pages into
    /// directly (`process_vm_writev`) before RESTORE_STATE.
    pub const PREFAULT_OK: u8 = 0x88;
    /// Restore mode, pages already written into guest memory by the
    /// broker: the body is the encoded vCPU state (answer: RESTORE_OK).
    pub const RESTORE_STATE: u8 = 0x09;
    /// The launch measurement the VMM computed (or carried through a
    /// restore); answer: MEASUREMENT_OK.
    pub const MEASUREMENT: u8 = 0x0A;
    /// Answer to MEASUREMENT: a [`super::LaunchMeasurement`].
    pub const MEASUREMENT_OK: u8 = 0x8A;
    /// The VM's snapshot: `[state_len u32][state][n u32][(gpa u64, page)*]`.
    pub const SNAPSHOT: u8 = 0x86;
    /// Restore done; the guest is ready.
    pub const RESTORE_OK: u8 = 0x87;
    /// Status answer.
    pub const STATUS_OK: u8 = 0x81;
    /// Call output.
    pub const CALL_OK: u8 = 0x82;
    /// Call failure.
    pub const CALL_ERR: u8 = 0x83;
    /// Shutdown acknowledged.
    pub const SHUTDOWN_OK: u8 = 0x84;
    /// Malformed request.
    pub const ERROR: u8 = 0x85;
    /// Event: guest READY.
    pub const EV_READY: u8 = 0xA1;
    /// Event: guest log line.
    pub const EV_LOG: u8 = 0xA2;
    /// Event: bubble failed.
    pub const EV_FAILED: u8 = 0xA3;
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Kind (see [`kind`]).
    pub kind: u8,
    /// Request id (0 for events).
    pub id: u64,
    /// Body.
    pub body: Vec<u8>,
}

impl Frame {
    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let len = 1 + 8 + self.body.len();
        let mut v = Vec::with_capacity(4 + len);
        v.extend((len as u32).to_le_bytes());
        v.push(self.kind);
        v.extend(self.id.to_le_bytes());
        v.extend(&self.body);
        v
    }

    /// Decodes a frame's content (after the length prefix).
    pub fn decode(buf: &[u8]) -> io::Result<Self> {
        if buf.len() < 9 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short frame"));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[1..9]);
        Ok(Frame {
            kind: buf[0],
            id: u64::from_le_bytes(id),
            body: buf[9..].to_vec(),
        })
    }

    /// Checks a length prefix.
    pub fn check_len(len: u32) -> io::Result<usize> {
        let len = len as usize;
        if !(9..=MAX_FRAME).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame length {len} out of range"),
            ));
        }
        Ok(len)
    }

    /// The 13 bytes before a body of `body_len` bytes: length, kind, id.
    pub fn head(kind: u8, id: u64, body_len: usize) -> [u8; HEAD_LEN] {
        let mut h = [0u8; HEAD_LEN];
        h[..4].copy_from_slice(&((9 + body_len) as u32).to_le_bytes());
        h[4] = kind;
        h[5..].copy_from_slice(&id.to_le_bytes());
        h
    }

    /// Parses a frame head: (kind, id, body length), the length checked.
    pub fn parse_head(h: &[u8; HEAD_LEN]) -> io::Result<(u8, u64, usize)> {
        let mut l = [0u8; 4];
        l.copy_from_slice(&h[..4]);
        let len = Self::check_len(u32::from_le_bytes(l))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[5..]);
        Ok((h[4], u64::from_le_bytes(id), len - 9))
    }

    /// Reads a frame head from a blocking stream (the body follows).
    pub fn read_head(r: &mut impl Read) -> io::Result<(u8, u64, usize)> {
        let mut h = [0u8; HEAD_LEN];
        r.read_exact(&mut h)?;
        Self::parse_head(&h)
    }

    /// Reads one frame from a blocking stream (the body lands in its own
    /// buffer, read once).
    pub fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let (kind, id, n) = Self::read_head(r)?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body)?;
        Ok(Frame { kind, id, body })
    }

    /// Writes the frame to a blocking stream: small frames in one write,
    /// large ones as head then body (no copy of the body).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        if self.body.len() <= COALESCE_MAX {
            return w.write_all(&self.encode());
        }
        w.write_all(&Self::head(self.kind, self.id, self.body.len()))?;
        w.write_all(&self.body)
    }
}

/// Why a call failed, in a `CALL_ERR` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CallErrKind {
    /// The guest refused the request; the bubble is fine.
    Rejected = 1,
    /// The guest overran the deadline and was stopped.
    Deadline = 2,
    /// The bubble is dead (reason in the text).
    Failed = 3,
    /// The request was malformed or too large; the bubble is fine.
    BadRequest = 4,
}

impl CallErrKind {
    /// Decodes the kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => CallErrKind::Rejected,
            2 => CallErrKind::Deadline,
            3 => CallErrKind::Failed,
            4 => CallErrKind::BadRequest,
            _ => return None,
        })
    }
}

/// The VMM's state, in a `STATUS_OK` body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Bubble id the VMM runs.
    pub bubble_id: String,
    /// Guest answered READY.
    pub ready: bool,
    /// Failure reason, if the bubble died.
    pub failed: Option<String>,
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
    /// Encodes the status.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.push(u8::from(self.ready));
        v.push(u8::from(self.failed.is_some()));
        v.extend(self.boot_us.to_le_bytes());
        v.extend(self.vcpu_us.to_le_bytes());
        v.extend(self.pid.to_le_bytes());
        v.extend(self.abi_version.to_le_bytes());
        v.extend((self.bubble_id.len() as u16).to_le_bytes());
        v.extend(self.bubble_id.as_bytes());
        if let Some(r) = &self.failed {
            v.extend(r.as_bytes());
        }
        v
    }

    /// Decodes a status body.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let ready = *b.first()? != 0;
        let failed = *b.get(1)? != 0;
        let boot_us = u64::from_le_bytes(b.get(2..10)?.try_into().ok()?);
        let vcpu_us = u64::from_le_bytes(b.get(10..18)?.try_into().ok()?);
        let pid = u32::from_le_bytes(b.get(18..22)?.try_into().ok()?);
        let abi_version = u16::from_le_bytes(b.get(22..24)?.try_into().ok()?);
        let n = u16::from_le_bytes(b.get(24..26)?.try_into().ok()?) as usize;
        let bubble_id = std::str::from_utf8(b.get(26..26 + n)?).ok()?.to_string();
        let rest = String::from_utf8_lossy(b.get(26 + n..)?).into_owned();
        Some(Status {
            bubble_id,
            ready,
            failed: failed.then_some(rest),
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

/// A `MEASUREMENT_OK` body: the bubble's SNP launch digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchMeasurement {
    /// Where it comes from.
    pub origin: LaunchOrigin,
    /// The launch digest (MEASUREMENT of the bubble's reports).
    pub digest: [u8; 48],
}

/// Why a `MEASUREMENT_OK` body was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeasurementDecodeError {
    /// The body is not 49 bytes.
    #[error("measurement body of {0} bytes, expected 49")]
    Length(usize),
    /// Unknown origin byte.
    #[error("unknown measurement origin {0}")]
    Origin(u8),
}

impl LaunchMeasurement {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(49);
        v.push(self.origin as u8);
        v.extend(self.digest);
        v
    }

    /// Decodes a body (exactly 49 bytes).
    pub fn decode(b: &[u8]) -> Result<Self, MeasurementDecodeError> {
        let (&o, d) = b
            .split_first()
            .filter(|(_, d)| d.len() == 48)
            .ok_or(MeasurementDecodeError::Length(b.len()))?;
        let origin = match o {
            1 => LaunchOrigin::Measured,
            2 => LaunchOrigin::Restored,
            other => return Err(MeasurementDecodeError::Origin(other)),
        };
        let mut digest = [0u8; 48];
        digest.copy_from_slice(d);
        Ok(LaunchMeasurement { origin, digest })
    }
}

/// Encodes a CALL body: the deadline, then the guest's CALL payload
/// (refused when the call breaks the guest contract's limits).
pub fn encode_call(
    deadline_ms: u32,
    call: &bubble_abi::Call<'_>,
) -> Result<Vec<u8>, bubble_abi::AbiError> {
    let mut v = vec![0u8; 4 + call.encoded_len()];
    v[..4].copy_from_slice(&deadline_ms.to_le_bytes());
    let n = call.encode_into(&mut v[4..])?;
    v.truncate(4 + n);
    Ok(v)
}

/// Decodes a CALL body into (deadline_ms, call).
pub fn decode_call(b: &[u8]) -> Option<(u32, bubble_abi::Call<'_>)> {
    let d = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
    let call = bubble_abi::Call::decode(b.get(4..)?).ok()?;
    Some((d, call))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_bodies_round_trip() {
        let f = Frame {
            kind: kind::CALL,
            id: 7,
            body: encode_call(250, &bubble_abi::Call::plain("sha256", b"abc")).unwrap(),
        };
        let enc = f.encode();
        let back = Frame::read_from(&mut &enc[..]).unwrap();
        assert_eq!(back, f);
        assert_eq!(
            decode_call(&back.body),
            Some((250, bubble_abi::Call::plain("sha256", b"abc")))
        );
        let s = Status {
            bubble_id: "b-1".into(),
            ready: true,
            failed: Some("boom".into()),
            boot_us: 5,
            vcpu_us: 6,
            pid: 7,
            abi_version: 1,
        };
        assert_eq!(Status::decode(&s.encode()), Some(s));
    }

    #[test]
    fn hostile_frames_are_rejected() {
        assert!(Frame::read_from(&mut &[0u8, 0, 0, 0][..]).is_err());
        assert!(Frame::read_from(&mut &[0xffu8, 0xff, 0xff, 0xff][..]).is_err());
        assert!(Frame::read_from(&mut &[20u8, 0, 0, 0, 1][..]).is_err());
        for n in 0..60 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            let _ = Status::decode(&junk);
            let _ = decode_call(&junk);
            assert!(LaunchMeasurement::decode(&junk).is_err());
        }
        let m = LaunchMeasurement {
            origin: LaunchOrigin::Restored,
            digest: [7u8; 48],
        };
        assert_eq!(LaunchMeasurement::decode(&m.encode()), Ok(m));
        let mut b = m.encode();
        b[0] = 9;
        assert_eq!(
            LaunchMeasurement::decode(&b),
            Err(MeasurementDecodeError::Origin(9))
        );
    }
}
