//! Bounds-checked reading and writing of little-endian fields.

use crate::AbiError;

/// A cursor over untrusted bytes; every read checks bounds.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { rest: b }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], AbiError> {
        if n > self.rest.len() {
            return Err(AbiError::Truncated);
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], AbiError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, AbiError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, AbiError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, AbiError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, AbiError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// `[len u8][bytes]`, with `len` in `1..=max`; `field` names it in errors.
    pub(crate) fn short(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], AbiError> {
        let n = usize::from(self.u8()?);
        if n == 0 || n > max {
            return Err(AbiError::BadLength {
                field,
                len: n as u64,
            });
        }
        self.bytes(n)
    }

    /// Like [`Reader::short`], and the bytes must be UTF-8.
    pub(crate) fn short_str(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a str, AbiError> {
        let b = self.short(field, max)?;
        core::str::from_utf8(b).map_err(|_| AbiError::BadText { field })
    }

    /// How many bytes are left.
    pub(crate) fn rest_len(&self) -> usize {
        self.rest.len()
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.rest)
    }

    /// Fails unless everything was read.
    pub(crate) fn end(&self) -> Result<(), AbiError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(AbiError::TrailingBytes(self.rest.len() as u64))
        }
    }
}

/// A writer into a caller's buffer; a write that does not fit fails.
pub(crate) struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self { out, at: 0 }
    }

    pub(crate) fn put(&mut self, b: &[u8]) -> Result<(), AbiError> {
        let end = self.at.checked_add(b.len()).ok_or(AbiError::NoSpace)?;
        let dst = self.out.get_mut(self.at..end).ok_or(AbiError::NoSpace)?;
        dst.copy_from_slice(b);
        self.at = end;
        Ok(())
    }

    /// `[len u8][bytes]`, with `len` in `1..=max`.
    pub(crate) fn short(
        &mut self,
        field: &'static str,
        b: &[u8],
        max: usize,
    ) -> Result<(), AbiError> {
        if b.is_empty() || b.len() > max || b.len() > 255 {
            return Err(AbiError::BadLength {
                field,
                len: b.len() as u64,
            });
        }
        self.put(&[b.len() as u8])?;
        self.put(b)
    }

    pub(crate) fn len(&self) -> usize {
        self.at
    }
}
