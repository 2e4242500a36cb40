//! Messages: the 64-byte header, the message types, the boot information
//! page, and the payloads of ERROR_REPLY, LOG and PANIC.
//!
//! A message is a [`Header`] followed by `length` payload bytes at the
//! start of the mailbox. How messages travel (doorbell, shared pages) is
//! the VMM's business (`bubble-vmm/src/transport.rs`), not the contract's.

use crate::wire::{Reader, Writer};
use crate::{
    AbiError, ABI_VERSION, BOOT_INFO_LEN, BOOT_INFO_MAGIC, HEADER_LEN, MAGIC, MAX_TEXT_LEN,
};

/// Message types. Guest to host: `Ready`, `Reply`, `ErrorReply`, `Log`,
/// `Panic`, `Awaiting`, `ReadyEarly`; host to guest: `Call`, `Resume`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// The guest booted (its start-up finished: its key pairs exist) and
    /// waits for its first request.
    Ready = 1,
    /// Successful answer to a CALL; payload is the output.
    Reply = 2,
    /// Failed CALL; payload is `[code u16][utf-8 text]`.
    ErrorReply = 3,
    /// A log line (rate-limited by the host); the guest continues at once.
    Log = 4,
    /// The guest panicked; payload is the message. The bubble is failed.
    Panic = 5,
    /// A portion of the pending CALL awaits an event: payload is a
    /// [`crate::Awaiting`]. The CALL is not answered yet.
    Awaiting = 6,
    /// The guest runs (heap and mailbox set up) and asks to be resumed
    /// once, with no request, to finish its start-up (make its key
    /// pairs); it then sends `Ready`. The host may report the bubble
    /// ready at once but sends no request before that `Ready`.
    ReadyEarly = 7,
    /// A request: payload is a [`crate::Call`].
    Call = 0x81,
    /// Continues the CALL that answered AWAITING: payload is a
    /// [`crate::Resume`].
    Resume = 0x82,
}

impl MsgType {
    /// Every type, in numeric order.
    pub const ALL: [MsgType; 9] = [
        MsgType::Ready,
        MsgType::Reply,
        MsgType::ErrorReply,
        MsgType::Log,
        MsgType::Panic,
        MsgType::Awaiting,
        MsgType::ReadyEarly,
        MsgType::Call,
        MsgType::Resume,
    ];

    /// Decodes a type number.
    pub fn from_u16(v: u16) -> Option<Self> {
        MsgType::ALL.iter().copied().find(|t| *t as u16 == v)
    }

    /// The type's name in the documentation.
    pub const fn name(self) -> &'static str {
        match self {
            MsgType::Ready => "READY",
            MsgType::Reply => "REPLY",
            MsgType::ErrorReply => "ERROR_REPLY",
            MsgType::Log => "LOG",
            MsgType::Panic => "PANIC",
            MsgType::Awaiting => "AWAITING",
            MsgType::ReadyEarly => "READY_EARLY",
            MsgType::Call => "CALL",
            MsgType::Resume => "RESUME",
        }
    }

    /// Whether the guest sends it (else the host does).
    pub const fn from_guest(self) -> bool {
        !matches!(self, MsgType::Call | MsgType::Resume)
    }
}

impl TryFrom<u16> for MsgType {
    type Error = AbiError;

    fn try_from(v: u16) -> Result<Self, AbiError> {
        MsgType::from_u16(v).ok_or(AbiError::UnknownType(v))
    }
}

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub msg_type: MsgType,
    /// Payload length in bytes.
    pub length: u32,
    /// Sequence number (echoed by replies; informational).
    pub seq: u64,
    /// Host to guest: the VMM's monotonic clock (`CLOCK_MONOTONIC`, ns)
    /// when it wrote the CALL; the guest's only clock (it paces the
    /// credential rate limit, `crate::rate`). Guest to host: zero. The
    /// host controls it; see `docs/portions.md`.
    pub host_time_ns: u64,
}

impl Header {
    /// Encodes the header into its 64-byte form (reserved bytes zero).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&ABI_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(self.msg_type as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.length.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.host_time_ns.to_le_bytes());
        h
    }

    /// Decodes and checks a header; `max_payload` bounds `length`.
    /// Reserved bytes are ignored.
    pub fn decode(b: &[u8], max_payload: u64) -> Result<Self, AbiError> {
        let b = b.get(..HEADER_LEN).ok_or(AbiError::Truncated)?;
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(AbiError::BadMagic(u64::from(magic)));
        }
        let version = r.u16()?;
        if version != ABI_VERSION {
            return Err(AbiError::BadVersion(u64::from(version)));
        }
        let msg_type = MsgType::try_from(r.u16()?)?;
        let length = r.u32()?;
        if u64::from(length) > max_payload {
            return Err(AbiError::TooLong {
                len: u64::from(length),
                max: max_payload,
            });
        }
        r.bytes(4)?;
        let seq = r.u64()?;
        let host_time_ns = r.u64()?;
        Ok(Header {
            msg_type,
            length,
            seq,
            host_time_ns,
        })
    }
}

/// Splits an ERROR_REPLY payload (`[code u16][utf-8 text ≤ MAX_TEXT_LEN]`)
/// into (code, text). The code is returned raw: a guest may send a code
/// this crate does not know ([`crate::ErrorCode::try_from`] tells).
pub fn decode_error(payload: &[u8]) -> Result<(u16, &str), AbiError> {
    let mut r = Reader::new(payload);
    let c = r.u16()?;
    let text = decode_text(r.rest())?;
    Ok((c, text))
}

/// Writes an ERROR_REPLY payload into `out`, cutting `text` to
/// [`MAX_TEXT_LEN`] bytes at a character boundary; returns its length.
pub fn encode_error(code: u16, text: &str, out: &mut [u8]) -> Result<usize, AbiError> {
    let mut n = text.len().min(MAX_TEXT_LEN);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    let mut w = Writer::new(out);
    w.put(&code.to_le_bytes())?;
    w.put(&text.as_bytes()[..n])?;
    Ok(w.len())
}

/// Checks a LOG, PANIC or ERROR_REPLY text: UTF-8, at most [`MAX_TEXT_LEN`] bytes.
pub fn decode_text(payload: &[u8]) -> Result<&str, AbiError> {
    if payload.len() > MAX_TEXT_LEN {
        return Err(AbiError::BadText { field: "text" });
    }
    core::str::from_utf8(payload).map_err(|_| AbiError::BadText { field: "text" })
}

/// What the VMM tells the guest at boot (at [`crate::BOOT_INFO_GPA`]):
/// eight little-endian u64 fields, magic and ABI version first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Guest-physical address of the mailbox.
    pub mailbox_gpa: u64,
    /// Mailbox size in bytes (header included).
    pub mailbox_size: u64,
    /// First byte of the heap.
    pub heap_start: u64,
    /// End of the heap (exclusive).
    pub heap_end: u64,
    /// Guest-physical address of the doorbell.
    pub doorbell_gpa: u64,
}

impl BootInfo {
    /// Encodes the boot information.
    pub fn encode(&self) -> [u8; BOOT_INFO_LEN] {
        let mut b = [0u8; BOOT_INFO_LEN];
        let fields = [
            BOOT_INFO_MAGIC,
            u64::from(ABI_VERSION),
            self.mem_size,
            self.mailbox_gpa,
            self.mailbox_size,
            self.heap_start,
            self.heap_end,
            self.doorbell_gpa,
        ];
        for (dst, f) in b.chunks_exact_mut(8).zip(fields) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    /// Decodes boot information (the first [`BOOT_INFO_LEN`] bytes of `b`).
    pub fn decode(b: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let magic = r.u64()?;
        if magic != BOOT_INFO_MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        let v = r.u64()?;
        if v != u64::from(ABI_VERSION) {
            return Err(AbiError::BadVersion(v));
        }
        Ok(BootInfo {
            mem_size: r.u64()?,
            mailbox_gpa: r.u64()?,
            mailbox_size: r.u64()?,
            heap_start: r.u64()?,
            heap_end: r.u64()?,
            doorbell_gpa: r.u64()?,
        })
    }
}
