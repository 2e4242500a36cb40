//! Guest ABI v1: the *messages* a bubble and its VMM exchange.
//!
//! This file is `core`-only: the guest shim compiles the very same file
//! (`#[path]` include), so host and guest cannot disagree on a constant.
//! How messages travel (the doorbell and the shared mailbox pages) lives in
//! [`crate::transport`]; on SEV-SNP only the transport changes (VMGEXIT
//! through the GHCB, shared pages), never these messages.
//!
//! A message is a 64-byte [`Header`] followed by `length` payload bytes, at
//! the start of the mailbox. Every field the guest writes is untrusted:
//! [`Header::decode`] and the payload parsers check magic, version, type
//! and bounds, and never panic.

/// ABI version carried in every header.
pub const ABI_VERSION: u16 = 1;
/// Header magic, "BBL1" little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BBL1");
/// Size of the message header.
pub const HEADER_LEN: usize = 64;
/// Longest op name in a CALL.
pub const MAX_OP_LEN: usize = 64;
/// Longest LOG or PANIC text the host accepts.
pub const MAX_TEXT_LEN: usize = 1024;

/// Guest-physical address of the boot information page.
pub const BOOT_INFO_GPA: u64 = 0xA000;
/// Magic of the boot information page ("BUBBLEB1").
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"BUBBLEB1");
/// Size of the encoded boot information.
pub const BOOT_INFO_LEN: usize = 64;

/// Message types. Guest to host: `Ready`, `Reply`, `ErrorReply`, `Log`,
/// `Panic`; host to guest: `Call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// The guest booted and waits for its first request.
    Ready = 1,
    /// Successful answer to a CALL; payload is the output.
    Reply = 2,
    /// Failed CALL; payload is `[code u16][utf-8 text]`.
    ErrorReply = 3,
    /// A log line (rate-limited by the host); the guest continues at once.
    Log = 4,
    /// The guest panicked; payload is the message. The bubble is failed.
    Panic = 5,
    /// A request: payload is `[op_len u8][op][input]`.
    Call = 0x81,
}

impl MsgType {
    /// Decodes a type number.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => MsgType::Ready,
            2 => MsgType::Reply,
            3 => MsgType::ErrorReply,
            4 => MsgType::Log,
            5 => MsgType::Panic,
            0x81 => MsgType::Call,
            _ => return None,
        })
    }
}

/// Error codes in an ERROR_REPLY.
pub mod code {
    /// The op is not known to the guest.
    pub const UNKNOWN_OP: u16 = 1;
    /// The input is malformed for the op.
    pub const BAD_INPUT: u16 = 2;
    /// The guest could not complete the op.
    pub const INTERNAL: u16 = 3;
    /// The output would not fit the mailbox.
    pub const TOO_LARGE: u16 = 4;
    /// A portion used a credential its policy does not grant.
    pub const DENIED: u16 = 5;
    /// A portion call ran out of fuel.
    pub const FUEL: u16 = 6;
    /// A portion exceeded its linear-memory limit.
    pub const MEMORY_LIMIT: u16 = 7;
    /// A portion's output exceeded the policy's limit.
    pub const OUTPUT_LIMIT: u16 = 8;
    /// A portion trapped.
    pub const TRAP: u16 = 9;
    /// A portion returned a non-zero status (refused the request).
    pub const PORTION_REFUSED: u16 = 10;
    /// The operation is not allowed in the bubble's current state.
    pub const STATE: u16 = 11;
}

/// Why guest bytes were rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// Fewer bytes than a header or a declared field.
    Truncated,
    /// The magic is wrong (the value found).
    BadMagic(u32),
    /// The ABI version is not supported (the value found).
    BadVersion(u16),
    /// The message type is unknown (the value found).
    UnknownType(u16),
    /// The declared length exceeds what the mailbox can hold.
    TooLong {
        /// Declared length.
        len: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A text field is not UTF-8 or too long.
    BadText,
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AbiError::Truncated => write!(f, "message truncated"),
            AbiError::BadMagic(m) => write!(f, "bad message magic {m:#010x}"),
            AbiError::BadVersion(v) => write!(f, "unsupported ABI version {v}"),
            AbiError::UnknownType(t) => write!(f, "unknown message type {t:#06x}"),
            AbiError::TooLong { len, max } => {
                write!(f, "message length {len} exceeds the mailbox capacity {max}")
            }
            AbiError::BadText => write!(f, "text field is not valid UTF-8 or too long"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> Result<u16, AbiError> {
    let s = b.get(at..at + 2).ok_or(AbiError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Result<u32, AbiError> {
    let s = b.get(at..at + 4).ok_or(AbiError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Result<u64, AbiError> {
    let s = b.get(at..at + 8).ok_or(AbiError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
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
}

impl Header {
    /// Encodes the header into its 64-byte form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&ABI_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(self.msg_type as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.length.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h
    }

    /// Decodes and checks a header; `max_payload` bounds `length`.
    pub fn decode(b: &[u8], max_payload: u64) -> Result<Self, AbiError> {
        if b.len() < HEADER_LEN {
            return Err(AbiError::Truncated);
        }
        let magic = le32(b, 0)?;
        if magic != MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        let version = le16(b, 4)?;
        if version != ABI_VERSION {
            return Err(AbiError::BadVersion(version));
        }
        let t = le16(b, 6)?;
        let msg_type = MsgType::from_u16(t).ok_or(AbiError::UnknownType(t))?;
        let length = le32(b, 8)?;
        if u64::from(length) > max_payload {
            return Err(AbiError::TooLong {
                len: u64::from(length),
                max: max_payload,
            });
        }
        Ok(Header {
            msg_type,
            length,
            seq: le64(b, 16)?,
        })
    }
}

/// Splits a CALL payload into (op, input).
pub fn decode_call(payload: &[u8]) -> Result<(&str, &[u8]), AbiError> {
    let n = *payload.first().ok_or(AbiError::Truncated)? as usize;
    if n == 0 || n > MAX_OP_LEN {
        return Err(AbiError::BadText);
    }
    let op = payload.get(1..1 + n).ok_or(AbiError::Truncated)?;
    let op = core::str::from_utf8(op).map_err(|_| AbiError::BadText)?;
    Ok((op, &payload[1 + n..]))
}

/// Writes a CALL payload (`[op_len][op][input]`) into `out`; returns its
/// length, or `None` if it does not fit or the op name is invalid.
pub fn encode_call(op: &str, input: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = op.len();
    if n == 0 || n > MAX_OP_LEN {
        return None;
    }
    let total = 1 + n + input.len();
    let dst = out.get_mut(..total)?;
    dst[0] = n as u8;
    dst[1..1 + n].copy_from_slice(op.as_bytes());
    dst[1 + n..].copy_from_slice(input);
    Some(total)
}

/// Splits an ERROR_REPLY payload into (code, text).
pub fn decode_error(payload: &[u8]) -> Result<(u16, &str), AbiError> {
    let c = le16(payload, 0)?;
    let text = &payload[2..];
    if text.len() > MAX_TEXT_LEN {
        return Err(AbiError::BadText);
    }
    Ok((
        c,
        core::str::from_utf8(text).map_err(|_| AbiError::BadText)?,
    ))
}

/// Checks a LOG or PANIC text.
pub fn decode_text(payload: &[u8]) -> Result<&str, AbiError> {
    if payload.len() > MAX_TEXT_LEN {
        return Err(AbiError::BadText);
    }
    core::str::from_utf8(payload).map_err(|_| AbiError::BadText)
}

/// What the VMM tells the guest at boot (at [`BOOT_INFO_GPA`]).
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
        for (i, f) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    /// Decodes boot information.
    pub fn decode(b: &[u8]) -> Result<Self, AbiError> {
        let magic = le64(b, 0)?;
        if magic != BOOT_INFO_MAGIC {
            return Err(AbiError::BadMagic(magic as u32));
        }
        let v = le64(b, 8)?;
        if v != u64::from(ABI_VERSION) {
            return Err(AbiError::BadVersion(v as u16));
        }
        Ok(BootInfo {
            mem_size: le64(b, 16)?,
            mailbox_gpa: le64(b, 24)?,
            mailbox_size: le64(b, 32)?,
            heap_start: le64(b, 40)?,
            heap_end: le64(b, 48)?,
            doorbell_gpa: le64(b, 56)?,
        })
    }
}
