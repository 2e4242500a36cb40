//! Bounds-checked reading of frame bodies, and the codec's errors.

/// Why a frame or body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A frame's length prefix is out of range.
    #[error("frame length {0} out of range")]
    FrameLength(usize),
    /// The frame kind is unknown, or not one this decoder reads.
    #[error("unexpected frame kind {0:#04x}")]
    UnexpectedKind(u8),
    /// The body ends before a field.
    #[error("{what}: body too short")]
    Short {
        /// The field.
        what: &'static str,
    },
    /// Bytes follow the last field.
    #[error("{what}: {extra} trailing bytes")]
    Trailing {
        /// The message.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field that must be UTF-8 is not.
    #[error("{what}: not UTF-8")]
    Utf8 {
        /// The field.
        what: &'static str,
    },
    /// A code byte has no meaning.
    #[error("{what}: unknown code {value}")]
    Code {
        /// The field.
        what: &'static str,
        /// The byte.
        value: u8,
    },
    /// A CALL's guest payload breaks the guest contract.
    #[error("CALL: {0}")]
    Call(bubble_abi::AbiError),
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A CALL's guest payload breaks the guest contract's limits.
    #[error("CALL: {0}")]
    Call(bubble_abi::AbiError),
    /// A length does not fit its field, or the frame exceeds the limit.
    #[error("{what} of {len} bytes is too large")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// A cursor over a body: every read is checked, nothing panics.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Self {
        Cursor { rest: b, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Short { what: self.what });
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// `n` bytes of strict UTF-8.
    pub(crate) fn str(&mut self, n: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(n)?).map_err(|_| DecodeError::Utf8 { what: self.what })
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Everything left, as text (invalid UTF-8 replaced: human text only).
    pub(crate) fn text(&mut self) -> String {
        String::from_utf8_lossy(self.rest()).into_owned()
    }

    /// Checks that nothing is left.
    pub(crate) fn end(self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Checks that an empty body is empty.
pub(crate) fn empty(b: &[u8], what: &'static str) -> Result<(), DecodeError> {
    Cursor::new(b, what).end()
}
