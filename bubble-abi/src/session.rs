//! Sealed sessions: the `portion_session` frame and the per-session
//! sequence window.
//!
//! A parent opens a session with a bubble once: it picks a 32-byte
//! AES-256-GCM session key and a session id, and HPKE-seals the key to the
//! bubble's attested KEM key (the *setup*, `bubble_keys::session`); each
//! call then carries the session id, a sequence number and the input
//! encrypted under the session key, so the bubble does one AES-GCM open
//! per call. The setup rides on a session's first call (and on later ones
//! until the parent saw the bubble accept it); a bubble that already holds
//! the session ignores it.

use crate::wire::{Reader, Writer};
use crate::{AbiError, MAX_BUBBLE_ID_LEN, MAX_NAME_LEN, MAX_OP_LEN};

/// Op: call a function of a loaded portion with an input encrypted under a
/// sealed session's key (opening the session first if the frame carries a
/// setup the bubble does not hold yet).
pub const OP_PORTION_SESSION: &str = "portion_session";

/// Longest session setup accepted (an HPKE sealed box of a 32-byte key is
/// 83 bytes).
pub const MAX_SETUP_LEN: usize = 256;

/// Sequence numbers a session remembers below its highest one.
pub const SESSION_WINDOW: u64 = 1024;

/// `portion_session` input:
/// `[len u8][bubble id][len u8][portion][len u8][function][session id u64]
/// [seq u64][setup len u16][setup][ciphertext ‖ tag]`, integers little
/// endian.
///
/// `setup` is empty or the session's HPKE setup; the ciphertext is the
/// function's input under the session key (nonce from `seq`, AAD binding
/// bubble id, portion, function, session id and `seq`). A signed call's
/// signature covers this whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionCall<'a> {
    /// The bubble's id, as the sealer bound it (1 to [`MAX_BUBBLE_ID_LEN`] bytes).
    pub bubble_id: &'a str,
    /// The portion's name (1 to [`MAX_NAME_LEN`] bytes).
    pub portion: &'a str,
    /// The exported function (1 to [`MAX_OP_LEN`] bytes).
    pub function: &'a str,
    /// The session (> 0).
    pub session_id: u64,
    /// The call's sequence number in the session (> 0).
    pub seq: u64,
    /// The session's setup, or empty (at most [`MAX_SETUP_LEN`] bytes).
    pub setup: &'a [u8],
    /// The encrypted input and its 16-byte tag (at least 16 bytes).
    pub ciphertext: &'a [u8],
}

/// Length of an AES-GCM tag: the shortest ciphertext.
const TAG_LEN: usize = 16;

impl<'a> SessionCall<'a> {
    /// Size of the encoding.
    pub fn encoded_len(&self) -> usize {
        3 + self.bubble_id.len()
            + self.portion.len()
            + self.function.len()
            + 18
            + self.setup.len()
            + self.ciphertext.len()
    }

    fn check(&self) -> Result<(), AbiError> {
        if self.session_id == 0 {
            return Err(AbiError::BadValue {
                field: "session id",
            });
        }
        if self.seq == 0 {
            return Err(AbiError::BadValue { field: "seq" });
        }
        if self.setup.len() > MAX_SETUP_LEN {
            return Err(AbiError::BadLength {
                field: "setup",
                len: self.setup.len() as u64,
            });
        }
        if self.ciphertext.len() < TAG_LEN {
            return Err(AbiError::BadLength {
                field: "ciphertext",
                len: self.ciphertext.len() as u64,
            });
        }
        Ok(())
    }

    /// Writes the frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, AbiError> {
        self.check()?;
        let mut w = Writer::new(out);
        w.short("bubble id", self.bubble_id.as_bytes(), MAX_BUBBLE_ID_LEN)?;
        w.short("portion", self.portion.as_bytes(), MAX_NAME_LEN)?;
        w.short("function", self.function.as_bytes(), MAX_OP_LEN)?;
        w.put(&self.session_id.to_le_bytes())?;
        w.put(&self.seq.to_le_bytes())?;
        // At most MAX_SETUP_LEN (checked), so it fits a u16.
        w.put(&(self.setup.len() as u16).to_le_bytes())?;
        w.put(self.setup)?;
        w.put(self.ciphertext)?;
        Ok(w.len())
    }

    /// The frame as a vector.
    #[cfg(feature = "alloc")]
    pub fn encode(&self) -> Result<alloc::vec::Vec<u8>, AbiError> {
        let mut v = alloc::vec![0u8; self.encoded_len()];
        let n = self.encode_into(&mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// Decodes the frame; every length is checked against what is left.
    pub fn decode(b: &'a [u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(b);
        let bubble_id = r.short_str("bubble id", MAX_BUBBLE_ID_LEN)?;
        let portion = r.short_str("portion", MAX_NAME_LEN)?;
        let function = r.short_str("function", MAX_OP_LEN)?;
        let session_id = r.u64()?;
        let seq = r.u64()?;
        let setup_len = usize::from(r.u16()?);
        if setup_len > MAX_SETUP_LEN {
            return Err(AbiError::BadLength {
                field: "setup",
                len: setup_len as u64,
            });
        }
        let setup = r.bytes(setup_len)?;
        let c = Self {
            bubble_id,
            portion,
            function,
            session_id,
            seq,
            setup,
            ciphertext: r.rest(),
        };
        c.check()?;
        Ok(c)
    }
}

/// The sequence numbers one session still accepts: the highest accepted
/// and a bitmap of the [`SESSION_WINDOW`] numbers below it (constant size,
/// like IPsec's and WireGuard's windows). A number is accepted once; one
/// more than [`SESSION_WINDOW`] below the highest is refused (it never ran:
/// the sender retries with a fresh number).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqWindow {
    highest: u64,
    /// Bit `i` set: `highest - i` was accepted (bit 0 is `highest`).
    bits: [u64; (SESSION_WINDOW / 64) as usize],
}

/// A sequence number that was used already or is too old.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRefused;

impl SeqWindow {
    /// An empty window (0 is never accepted).
    pub const fn new() -> Self {
        Self {
            highest: 0,
            bits: [0; (SESSION_WINDOW / 64) as usize],
        }
    }

    fn bit(&self, back: u64) -> bool {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Whether `seq` would be accepted now (nothing changes).
    pub fn check(&self, seq: u64) -> Result<(), SeqRefused> {
        if seq == 0 {
            return Err(SeqRefused);
        }
        if seq > self.highest {
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= SESSION_WINDOW || self.bit(back) {
            Err(SeqRefused)
        } else {
            Ok(())
        }
    }

    /// Accepts `seq` once. Call only after the call authenticated.
    pub fn accept(&mut self, seq: u64) -> Result<(), SeqRefused> {
        self.check(seq)?;
        if seq > self.highest {
            let shift = seq - self.highest;
            self.shift(shift);
            self.highest = seq;
        }
        let back = self.highest - seq;
        let (w, b) = ((back / 64) as usize, back % 64);
        if let Some(x) = self.bits.get_mut(w) {
            *x |= 1 << b;
        }
        Ok(())
    }

    /// Moves every bit `by` places back (older), dropping what falls out.
    fn shift(&mut self, by: u64) {
        if by >= SESSION_WINDOW {
            self.bits = [0; (SESSION_WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        let n = self.bits.len();
        for i in (0..n).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.bits[j]);
            let carry = match (bits, i.checked_sub(words + 1)) {
                (0, _) | (_, None) => 0,
                (_, Some(j)) => self.bits[j] >> (64 - bits),
            };
            self.bits[i] = (lo << bits) | carry;
        }
    }

    /// The highest sequence number accepted (0: none yet).
    pub fn highest(&self) -> u64 {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> SessionCall<'static> {
        SessionCall {
            bubble_id: "bub-1",
            portion: "payments",
            function: "tokenize",
            session_id: 7,
            seq: 9,
            setup: &[5u8; 83],
            ciphertext: &[1u8; 32],
        }
    }

    #[test]
    fn frames_round_trip_and_every_prefix_is_refused() {
        for f in [
            frame(),
            SessionCall {
                setup: &[],
                ..frame()
            },
        ] {
            let b = f.encode().unwrap();
            assert_eq!(b.len(), f.encoded_len());
            assert_eq!(SessionCall::decode(&b).unwrap(), f);
            // Cut anywhere before the tag ends: refused, never a panic.
            let min = b.len() - f.ciphertext.len() + TAG_LEN;
            for n in 0..min {
                assert!(SessionCall::decode(&b[..n]).is_err(), "prefix {n}");
            }
        }
    }

    #[test]
    fn bad_fields_are_refused() {
        for f in [
            SessionCall {
                session_id: 0,
                ..frame()
            },
            SessionCall { seq: 0, ..frame() },
            SessionCall {
                ciphertext: &[0; 15],
                ..frame()
            },
            SessionCall {
                setup: &[0; MAX_SETUP_LEN + 1],
                ..frame()
            },
        ] {
            assert!(f.encode().is_err());
        }
        // A setup length past the end or above the maximum.
        let mut b = frame().encode().unwrap();
        let at = 3 + 5 + 8 + 8 + 16;
        b[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(SessionCall::decode(&b).is_err());
        b[at..at + 2].copy_from_slice(&(MAX_SETUP_LEN as u16 + 1).to_le_bytes());
        assert!(SessionCall::decode(&b).is_err());
    }

    #[test]
    fn window_accepts_each_number_once_and_stays_bounded() {
        let mut w = SeqWindow::new();
        assert_eq!(w.accept(0), Err(SeqRefused));
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(5), Err(SeqRefused));
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(SeqRefused));
        assert_eq!(w.check(4), Ok(()));
        // Jumps of every size keep earlier numbers in the window refused.
        let mut seen = std::collections::BTreeSet::new();
        let mut w = SeqWindow::new();
        let mut s = 1u64;
        for step in [
            1u64, 2, 63, 64, 65, 1, 127, 128, 500, 1023, 1024, 1, 3000, 7,
        ] {
            s += step;
            assert_eq!(w.accept(s), Ok(()));
            seen.insert(s);
            for &old in &seen {
                assert_eq!(w.accept(old), Err(SeqRefused), "{old} after {s}");
            }
            // Unseen numbers still in the window are accepted exactly once.
            if s > 2 && !seen.contains(&(s - 1)) {
                assert_eq!(w.accept(s - 1), Ok(()));
                seen.insert(s - 1);
            }
        }
        // Far below the highest: refused, seen or not.
        assert_eq!(w.check(w.highest() - SESSION_WINDOW), Err(SeqRefused));
    }
}
