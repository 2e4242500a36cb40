//! Frames: the head (length, kind, id) and writing a frame; frame kinds.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

use super::wire::{DecodeError, EncodeError};

/// Largest frame a sender may announce. Snapshots never travel in one
/// frame: they are cut into pieces of at most [`SNAPSHOT_PIECE`] bytes,
/// so their size is bounded by guest memory only (calls are bounded by
/// the payload limit).
pub const MAX_FRAME: usize = 1 << 30;

/// Most snapshot bytes in one `SNAPSHOT` or `RESTORE_DATA` frame.
pub const SNAPSHOT_PIECE: usize = 1 << 20;

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
    RestoreData = 0x0B,
    StatusOk = 0x81,
    CallOk = 0x82,
    CallErr = 0x83,
    ShutdownOk = 0x84,
    Error = 0x85,
    Snapshot = 0x86,
    RestoreOk = 0x87,
    PrefaultOk = 0x88,
    SnapshotEnd = 0x89,
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
        Kind::RestoreData,
        Kind::StatusOk,
        Kind::CallOk,
        Kind::CallErr,
        Kind::ShutdownOk,
        Kind::Error,
        Kind::Snapshot,
        Kind::RestoreOk,
        Kind::PrefaultOk,
        Kind::SnapshotEnd,
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
/// A body whose frame would exceed [`MAX_FRAME`] (or not fit the `u32`
/// length) is refused before any cast.
pub fn head(kind: u8, id: u64, body_len: usize) -> Result<[u8; HEAD_LEN], EncodeError> {
    let too_large = EncodeError::TooLarge {
        what: "frame",
        len: body_len,
    };
    let len = body_len
        .checked_add(9)
        .filter(|l| *l <= MAX_FRAME)
        .and_then(|l| u32::try_from(l).ok())
        .ok_or(too_large)?;
    let mut h = [0u8; HEAD_LEN];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4] = kind;
    h[5..].copy_from_slice(&id.to_le_bytes());
    Ok(h)
}

/// Writes a frame to a blocking stream: small bodies behind their head in
/// one write, large ones as head then body (no copy of the body).
pub fn write_frame(w: &mut impl Write, kind: Kind, id: u64, body: &[u8]) -> io::Result<()> {
    let h = head(kind as u8, id, body.len())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if body.len() <= COALESCE_MAX {
        let mut v = Vec::with_capacity(HEAD_LEN + body.len());
        v.extend_from_slice(&h);
        v.extend_from_slice(body);
        return w.write_all(&v);
    }
    w.write_all(&h)?;
    w.write_all(body)
}

/// Reads a snapshot of `len` bytes that arrives as a sequence of frames
/// of one kind and request id (`RESTORE_DATA` after a `RESTORE`), each
/// 1..=[`SNAPSHOT_PIECE`] bytes, as one byte stream. Any other frame, or
/// a piece beyond `len`, is an `InvalidData` error; after `len` bytes it
/// reads nothing more.
pub struct PieceReader<'r, R: Read> {
    inner: &'r mut R,
    kind: Kind,
    id: u64,
    in_frame: usize,
    left: u64,
}

impl<'r, R: Read> PieceReader<'r, R> {
    /// A reader of `len` bytes sent as frames of `kind` and `id`.
    pub fn new(inner: &'r mut R, kind: Kind, id: u64, len: u64) -> Self {
        PieceReader {
            inner,
            kind,
            id,
            in_frame: 0,
            left: len,
        }
    }
}

impl<R: Read> Read for PieceReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.in_frame == 0 {
            let h = Head::read(self.inner)?;
            let fits = (1..=SNAPSHOT_PIECE).contains(&h.body_len) && h.body_len as u64 <= self.left;
            if h.kind != self.kind as u8 || h.id != self.id || !fits {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    DecodeError::UnexpectedKind(h.kind),
                ));
            }
            self.in_frame = h.body_len;
        }
        let k = buf.len().min(self.in_frame);
        let n = self.inner.read(&mut buf[..k])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.in_frame -= n;
        self.left -= n as u64;
        Ok(n)
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
