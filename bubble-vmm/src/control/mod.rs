//! Control protocol between the broker and a VMM process, over the bubble's
//! Unix socket: one typed codec ([`Request`], [`Reply`], [`Event`]) used by
//! both sides.
//!
//! A frame is `[len u32 LE][kind u8][id u64 LE][body]`, where `len` counts
//! kind, id and body and is at most [`MAX_FRAME`]. Requests carry an id
//! chosen by the broker; the reply carries the same id. Events from the
//! VMM carry id 0. Integers are little-endian; "text" is UTF-8 to the end
//! of the body.
//!
//! | kind | direction | body |
//! |------|-----------|------|
//! | `HELLO` 0x01 | broker → VMM | expected bubble id (UTF-8) |
//! | `STATUS` 0x02 | broker → VMM | empty |
//! | `CALL` 0x03 | broker → VMM | `[deadline_ms u32][op_len u8][op][input]` |
//! | `SHUTDOWN` 0x04 | broker → VMM | empty |
//! | `CONFIGURE` 0x05 | broker → spare VMM | its arguments, NUL-separated (first frame only) |
//! | `SUSPEND` 0x06 | broker → VMM | empty (reply: `SNAPSHOT`) |
//! | `RESTORE` 0x07 | broker → VMM (restore mode) | a snapshot, streamed into guest memory |
//! | `PREFAULT` 0x08 | broker → VMM (restore mode) | `[n u32][(gpa u64, pages u64)*]` page runs to fault in (zeroes only) |
//! | `RESTORE_STATE` 0x09 | broker → VMM (restore mode) | vCPU state; the pages are already in guest memory |
//! | `MEASUREMENT` 0x0A | broker → VMM | empty (reply: `MEASUREMENT_OK`, or `ERROR`) |
//! | `STATUS_OK` 0x81 | VMM → broker | [`Status`]: `[ready u8][failure kind u8, 0 none][boot_us u64][vcpu_us u64][pid u32][abi u16][id_len u16][id][failure detail]` |
//! | `CALL_OK` 0x82 | VMM → broker | output |
//! | `CALL_ERR` 0x83 | VMM → broker | [`CallErr`]: `[1][guest code u16][text]` rejected, `[2][text]` deadline, `[3][failure kind u8][detail]` failed, `[4][text]` bad request |
//! | `SHUTDOWN_OK` 0x84 | VMM → broker | empty |
//! | `ERROR` 0x85 | VMM → broker | `[code u8][text]` ([`ErrorCode`]): the request was refused, the bubble is unaffected |
//! | `SNAPSHOT` 0x86 | VMM → broker | `[state_len u32][state][n u32][(gpa u64, page)*]` |
//! | `RESTORE_OK` 0x87 | VMM → broker | `[µs u64]` the VMM took |
//! | `PREFAULT_OK` 0x88 | VMM → broker | `[host address u64][length u64]` of guest memory, or empty |
//! | `MEASUREMENT_OK` 0x8A | VMM → broker | [`LaunchMeasurement`]: `[origin u8][digest 48]` |
//! | `EV_READY` 0xA1 | VMM → broker | `[boot_us u64]` |
//! | `EV_LOG` 0xA2 | VMM → broker | text |
//! | `EV_FAILED` 0xA3 | VMM → broker | [`FailureReason`]: `[failure kind u8][detail]` ([`FailureKind`] codes) |
//!
//! Decoders check every length and never panic; a body that does not
//! decode is a [`DecodeError`]. Large bodies are never copied by the
//! codec: a `SNAPSHOT` or `CALL_OK` body is moved into its [`Reply`] and
//! written after its head as it is, and a `RESTORE` body is streamed by
//! the VMM straight from the socket into guest memory.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

mod event;
mod failure;
mod reply;
mod request;
mod wire;

pub use event::Event;
pub use failure::{FailureKind, FailureReason};
pub use reply::{CallErr, ErrorCode, GuestSpan, LaunchMeasurement, LaunchOrigin, Reply, Status};
pub use request::{decode_runs, encode_runs, Call, Request};
pub use wire::{DecodeError, EncodeError};

/// Largest frame: snapshots are the largest messages (calls are bounded by
/// the payload limit), so a bubble can be suspended with up to ~1 GiB of
/// touched memory.
pub const MAX_FRAME: usize = 1 << 30;

/// Length prefix, kind and id: the bytes before a frame's body.
pub const HEAD_LEN: usize = 13;

/// Bodies up to this size are copied behind their head and sent in one
/// write; larger ones are sent as they are, after the head.
pub const COALESCE_MAX: usize = 64 << 10;

/// Frame kinds (see the table above).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Kind {
    Hello = 0x01,
    Status = 0x02,
    Call = 0x03,
    Shutdown = 0x04,
    Configure = 0x05,
    Suspend = 0x06,
    Restore = 0x07,
    Prefault = 0x08,
    RestoreState = 0x09,
    Measurement = 0x0A,
    StatusOk = 0x81,
    CallOk = 0x82,
    CallErr = 0x83,
    ShutdownOk = 0x84,
    Error = 0x85,
    Snapshot = 0x86,
    RestoreOk = 0x87,
    PrefaultOk = 0x88,
    MeasurementOk = 0x8A,
    EvReady = 0xA1,
    EvLog = 0xA2,
    EvFailed = 0xA3,
}

impl Kind {
    /// Every kind.
    pub const ALL: &'static [Kind] = &[
        Kind::Hello,
        Kind::Status,
        Kind::Call,
        Kind::Shutdown,
        Kind::Configure,
        Kind::Suspend,
        Kind::Restore,
        Kind::Prefault,
        Kind::RestoreState,
        Kind::Measurement,
        Kind::StatusOk,
        Kind::CallOk,
        Kind::CallErr,
        Kind::ShutdownOk,
        Kind::Error,
        Kind::Snapshot,
        Kind::RestoreOk,
        Kind::PrefaultOk,
        Kind::MeasurementOk,
        Kind::EvReady,
        Kind::EvLog,
        Kind::EvFailed,
    ];

    /// The kind of a byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == b)
    }

    /// An event (VMM → broker, unasked).
    pub fn is_event(b: u8) -> bool {
        matches!(
            Kind::from_u8(b),
            Some(Kind::EvReady | Kind::EvLog | Kind::EvFailed)
        )
    }
}

/// A frame's head: kind byte (possibly unknown), request id, body length
/// (checked against [`MAX_FRAME`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Kind byte.
    pub kind: u8,
    /// Request id (0 for events).
    pub id: u64,
    /// Body length.
    pub body_len: usize,
}

impl Head {
    /// Parses the 13 bytes before a body.
    pub fn parse(h: &[u8; HEAD_LEN]) -> Result<Self, DecodeError> {
        let mut l = [0u8; 4];
        l.copy_from_slice(&h[..4]);
        let len = u32::from_le_bytes(l) as usize;
        if !(9..=MAX_FRAME).contains(&len) {
            return Err(DecodeError::FrameLength(len));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[5..]);
        Ok(Head {
            kind: h[4],
            id: u64::from_le_bytes(id),
            body_len: len - 9,
        })
    }

    /// Reads a head from a blocking stream (the body follows).
    pub fn read(r: &mut impl Read) -> io::Result<Self> {
        let mut h = [0u8; HEAD_LEN];
        r.read_exact(&mut h)?;
        Self::parse(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Reads the body this head announces into its own buffer (read once).
    pub fn read_body(&self, r: &mut impl Read) -> io::Result<Vec<u8>> {
        let mut body = vec![0u8; self.body_len];
        r.read_exact(&mut body)?;
        Ok(body)
    }
}

/// The 13 bytes before a body of `body_len` bytes: length, kind, id.
/// `body_len` must be at most `MAX_FRAME - 9` (callers check).
pub fn head(kind: u8, id: u64, body_len: usize) -> [u8; HEAD_LEN] {
    let mut h = [0u8; HEAD_LEN];
    h[..4].copy_from_slice(&((9 + body_len) as u32).to_le_bytes());
    h[4] = kind;
    h[5..].copy_from_slice(&id.to_le_bytes());
    h
}

/// Writes a frame to a blocking stream: small bodies behind their head in
/// one write, large ones as head then body (no copy of the body).
pub fn write_frame(w: &mut impl Write, kind: Kind, id: u64, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME - 9 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            EncodeError::TooLarge {
                what: "frame",
                len: body.len(),
            },
        ));
    }
    let h = head(kind as u8, id, body.len());
    if body.len() <= COALESCE_MAX {
        let mut v = Vec::with_capacity(HEAD_LEN + body.len());
        v.extend_from_slice(&h);
        v.extend_from_slice(body);
        return w.write_all(&v);
    }
    w.write_all(&h)?;
    w.write_all(body)
}

impl Reply {
    /// Writes the reply to request `id`.
    pub fn write_to(&self, id: u64, w: &mut impl Write) -> io::Result<()> {
        write_frame(w, self.kind(), id, &self.body())
    }
}

impl Event {
    /// Writes the event (id 0).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        write_frame(w, self.kind(), 0, &self.body())
    }
}

/// Polls `fd` (without consuming anything) until data or end of stream is
/// there, or `budget` has passed; returns whether data came in time. Yields
/// the CPU between polls, so that runnable threads go first.
pub fn spin_readable(fd: &impl AsFd, budget: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + budget;
    let mut b = [0u8; 1];
    loop {
        // SAFETY: a non-blocking peek of at most one byte into a local
        // buffer; nothing is consumed.
        let n = unsafe {
            libc::recv(
                fd.as_fd().as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests;
