//! Why bytes were rejected by a decoder (or did not fit an encoder).

/// Why bytes were rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// Fewer bytes than a header or a declared field.
    Truncated,
    /// Bytes left over after the last field of a fixed layout.
    TrailingBytes(u64),
    /// The magic is wrong (the value found).
    BadMagic(u64),
    /// The ABI version is not supported (the value found).
    BadVersion(u64),
    /// The message type is unknown (the value found).
    UnknownType(u16),
    /// The declared length exceeds what the mailbox can hold.
    TooLong {
        /// Declared length.
        len: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A text field is not UTF-8 (or a LOG/PANIC/ERROR text is too long).
    BadText {
        /// The field.
        field: &'static str,
    },
    /// A length-prefixed field is empty or longer than its limit.
    BadLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: u64,
    },
    /// CALL flags with unknown bits, or SEAL without SIGN (the byte found).
    BadFlags(u8),
    /// A field holds a value outside its range.
    BadValue {
        /// The field.
        field: &'static str,
    },
    /// The encoding does not fit the output buffer.
    NoSpace,
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AbiError::Truncated => write!(f, "message truncated"),
            AbiError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the last field"),
            AbiError::BadMagic(m) => write!(f, "bad message magic {m:#010x}"),
            AbiError::BadVersion(v) => write!(f, "unsupported ABI version {v}"),
            AbiError::UnknownType(t) => write!(f, "unknown message type {t:#06x}"),
            AbiError::TooLong { len, max } => {
                write!(f, "message length {len} exceeds the mailbox capacity {max}")
            }
            AbiError::BadText { field } => {
                write!(f, "{field} is not valid UTF-8 or too long")
            }
            AbiError::BadLength { field, len } => {
                write!(f, "{field} has a length of {len} bytes, outside its limits")
            }
            AbiError::BadFlags(b) => write!(f, "invalid call flags {b:#04x}"),
            AbiError::BadValue { field } => write!(f, "{field} is out of range"),
            AbiError::NoSpace => write!(f, "the encoding does not fit the buffer"),
        }
    }
}
