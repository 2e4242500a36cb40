//! Resumable executions: the AWAITING message a guest answers a pending
//! CALL with when a portion calls `await_event`, and the RESUME message
//! the host continues that same call with (an event's payload, or the
//! timeout).
//!
//! AWAITING (guest → host): `[timeout_ms u32][key_len u8][key]`, the key
//! 1..=[`MAX_AWAIT_KEY_LEN`] bytes of `A-Z a-z 0-9 . _ : -`, the timeout
//! 1..=[`MAX_AWAIT_TIMEOUT_MS`]. The guest then waits in the same doorbell
//! exit; until a RESUME comes it answers any CALL with ERROR_REPLY
//! AWAITING.
//!
//! RESUME (host → guest): `[status u8][payload]`: status 1 (an event:
//! `payload` is its bytes) or 2 (the timeout passed: no payload). The
//! guest answers it with the REPLY or ERROR_REPLY of the CALL that
//! awaited (or with another AWAITING if the portion awaits again).

use crate::wire::Reader;
use crate::AbiError;

/// The op of the broker → VMM CALL that carries a RESUME: its input is
/// the [`Resume`] payload, and the VMM sends it to the guest as a RESUME
/// message, never as a CALL.
pub const OP_RESUME: &str = "resume";

/// Longest await key, in bytes.
pub const MAX_AWAIT_KEY_LEN: usize = 64;
/// Longest await timeout, ms (7 days).
pub const MAX_AWAIT_TIMEOUT_MS: u32 = 7 * 24 * 3600 * 1000;

/// Whether `key` is a valid await key: 1..=[`MAX_AWAIT_KEY_LEN`] bytes of
/// `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_await_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= MAX_AWAIT_KEY_LEN
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

/// An AWAITING payload: the portion waits for the event `key`, at most
/// `timeout_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Awaiting<'a> {
    /// What the portion waits for.
    pub key: &'a str,
    /// How long, ms.
    pub timeout_ms: u32,
}

impl<'a> Awaiting<'a> {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        5 + self.key.len()
    }

    /// Encodes into `out`; returns the length. Refuses an invalid key or
    /// timeout.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        if !is_valid_await_key(self.key.as_bytes()) {
            return Err(AbiError::BadLength {
                field: "await key",
                len: self.key.len() as u64,
            });
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_AWAIT_TIMEOUT_MS {
            return Err(AbiError::BadValue {
                field: "await timeout",
            });
        }
        let n = self.encoded_len();
        let out = out.get_mut(..n).ok_or(AbiError::NoSpace)?;
        out[..4].copy_from_slice(&self.timeout_ms.to_le_bytes());
        out[4] = self.key.len() as u8;
        out[5..].copy_from_slice(self.key.as_bytes());
        Ok(n)
    }

    /// Decodes untrusted bytes (all of them).
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let timeout_ms = r.u32()?;
        if timeout_ms == 0 || timeout_ms > MAX_AWAIT_TIMEOUT_MS {
            return Err(AbiError::BadValue {
                field: "await timeout",
            });
        }
        let key = r.short("await key", MAX_AWAIT_KEY_LEN)?;
        if !is_valid_await_key(key) {
            return Err(AbiError::BadText { field: "await key" });
        }
        r.end()?;
        // Checked above: ASCII only.
        let key =
            core::str::from_utf8(key).map_err(|_| AbiError::BadText { field: "await key" })?;
        Ok(Awaiting { key, timeout_ms })
    }
}

/// How an await ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume<'a> {
    /// The event arrived: its payload.
    Event(&'a [u8]),
    /// The timeout passed.
    Timeout,
}

impl<'a> Resume<'a> {
    /// Status byte of an event.
    pub const EVENT: u8 = 1;
    /// Status byte of a timeout.
    pub const TIMEOUT: u8 = 2;

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        match self {
            Resume::Event(p) => 1 + p.len(),
            Resume::Timeout => 1,
        }
    }

    /// Encodes into `out`; returns the length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        let n = self.encoded_len();
        let out = out.get_mut(..n).ok_or(AbiError::NoSpace)?;
        match self {
            Resume::Event(p) => {
                out[0] = Self::EVENT;
                out[1..].copy_from_slice(p);
            }
            Resume::Timeout => out[0] = Self::TIMEOUT,
        }
        Ok(n)
    }

    /// Decodes untrusted bytes (all of them).
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        match r.u8()? {
            Self::EVENT => Ok(Resume::Event(r.rest())),
            Self::TIMEOUT => {
                r.end()?;
                Ok(Resume::Timeout)
            }
            _ => Err(AbiError::BadValue {
                field: "resume status",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awaiting_round_trips_and_refuses_garbage() {
        let a = Awaiting {
            key: "capture:order-17",
            timeout_ms: 1500,
        };
        let mut buf = [0u8; 128];
        let n = a.encode_into(&mut buf).unwrap();
        assert_eq!(Awaiting::decode(&buf[..n]), Ok(a));
        // Every truncation fails, and so do trailing bytes.
        for k in 0..n {
            assert!(Awaiting::decode(&buf[..k]).is_err(), "{k}");
        }
        assert!(Awaiting::decode(&buf[..n + 1]).is_err());
        // Oversized or garbage keys, zero or huge timeouts.
        let long = [b'k'; MAX_AWAIT_KEY_LEN + 1];
        let mut b = std::vec::Vec::from(1000u32.to_le_bytes());
        b.push(long.len() as u8);
        b.extend_from_slice(&long);
        assert!(Awaiting::decode(&b).is_err());
        for key in [&b"a b"[..], b"\xff", b"a/b", b""] {
            let mut b = std::vec::Vec::from(1000u32.to_le_bytes());
            b.push(key.len() as u8);
            b.extend_from_slice(key);
            assert!(Awaiting::decode(&b).is_err(), "{key:?}");
        }
        for t in [0, MAX_AWAIT_TIMEOUT_MS + 1, u32::MAX] {
            let mut b = std::vec::Vec::from(t.to_le_bytes());
            b.extend_from_slice(&[1, b'k']);
            assert!(Awaiting::decode(&b).is_err(), "{t}");
        }
        assert!(Awaiting {
            key: "",
            timeout_ms: 1
        }
        .encode_into(&mut buf)
        .is_err());
        assert!(Awaiting {
            key: "k",
            timeout_ms: 0
        }
        .encode_into(&mut buf)
        .is_err());
        assert!(a.encode_into(&mut [0u8; 4]).is_err());
    }

    #[test]
    fn resume_round_trips_and_refuses_garbage() {
        let mut buf = [0u8; 16];
        for r in [
            Resume::Event(b"captured"),
            Resume::Event(b""),
            Resume::Timeout,
        ] {
            let n = r.encode_into(&mut buf).unwrap();
            assert_eq!(Resume::decode(&buf[..n]), Ok(r));
        }
        assert!(Resume::decode(&[]).is_err());
        assert!(Resume::decode(&[0]).is_err());
        assert!(Resume::decode(&[3, 1]).is_err());
        assert!(Resume::decode(&[Resume::TIMEOUT, 1]).is_err());
        assert!(Resume::Event(&[0u8; 16]).encode_into(&mut buf).is_err());
    }
}
