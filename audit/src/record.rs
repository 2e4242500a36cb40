//! One audit record and its bounds-checked binary codec.
//!
//! ```text
//! frame := u32 LE body_len (1..=MAX_BODY) ‖ body
//! body  := u8 version (1) ‖ u64 LE seq ‖ [32] prev ‖ u64 LE at_ms ‖ u8 tag
//!          ‖ str bubble ‖ str owner ‖ str parent ‖ str portion_digest
//!          ‖ what (by tag)
//! str   := u16 LE len (≤ MAX_STR) ‖ UTF-8
//! tag 1 lifecycle : str state ‖ str reason
//! tag 2 credential: u8 action (1 provision, 2 use) ‖ str name ‖ u8 outcome (1 ok, 2 denied, 3 failed)
//! tag 3 security  : str kind
//! tag 4 checkpoint: [32] Ed25519 public key ‖ [64] signature
//! ```
//!
//! `prev` is the SHA-256 of the previous record's whole frame (zero for the
//! first record); a checkpoint's signature covers [`checkpoint_message`]
//! of its own `seq`, `prev` and time, and so every record before it; its
//! other common fields are empty.

use sha2::{Digest, Sha256};

/// Largest record body, bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest string field, bytes.
pub const MAX_STR: usize = 1024;
/// Codec version written and accepted.
pub const VERSION: u8 = 1;
/// Domain separation of checkpoint signatures (the key also signs usage
/// reports, whose signed bytes start with `{`).
pub const CHECKPOINT_DOMAIN: &[u8] = b"bubbled-audit-checkpoint-v1\0";

/// What a credential operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialAction {
    /// A sealed credential was relayed into a bubble.
    Provision,
    /// A credential was used (or its use was attempted).
    Use,
}

/// How a credential operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// A policy or grant refused it.
    Denied,
    /// It failed otherwise.
    Failed,
}

/// What a record says happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// A bubble changed state.
    Lifecycle {
        /// The new state's name.
        state: String,
        /// Why (failures), else empty.
        reason: String,
    },
    /// A credential was provisioned or used; never its value.
    Credential {
        /// Provision or use.
        action: CredentialAction,
        /// The credential's name (empty when the broker cannot know it).
        name: String,
        /// How it ended.
        outcome: Outcome,
    },
    /// A security event.
    Security {
        /// Its kind's label.
        kind: String,
    },
    /// An operator (a configured admin, in `parent`) acted across parents:
    /// `describe` or `delete` of another parent's bubble, `drain` or
    /// `undrain` of the broker.
    Admin {
        /// What it did.
        action: String,
    },
    /// A signed checkpoint over every record before it.
    Checkpoint {
        /// The signer's Ed25519 public key.
        key: [u8; 32],
        /// Signature over [`checkpoint_message`].
        signature: [u8; 64],
    },
}

impl What {
    /// Security-relevant records (security events, credential provisions
    /// and uses, operators' actions): the writer signs a checkpoint in the
    /// same write as one of these, so none of them is ever in the unsigned
    /// tail that a truncation could cut undetected (the broker pins every
    /// checkpoint).
    pub fn checkpoint_at_once(&self) -> bool {
        matches!(
            self,
            What::Credential { .. } | What::Security { .. } | What::Admin { .. }
        )
    }
}

/// The facts of a record that its writer supplies (the log adds the
/// sequence number, the chain hash and, if unset, the time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The bubble concerned (may be empty).
    pub bubble: String,
    /// Its owner when known.
    pub owner: String,
    /// The parent that acted (empty: the broker itself).
    pub parent: String,
    /// SHA-384 (hex) of the portion module concerned, when known.
    pub portion_digest: String,
    /// Unix milliseconds (0: the log stamps it).
    pub at_ms: u64,
}

/// One record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in the log, from 0.
    pub seq: u64,
    /// SHA-256 of the previous record's frame.
    pub prev: [u8; 32],
    /// Common facts.
    pub entry: Entry,
    /// What happened.
    pub what: What,
}

/// Why bytes are not a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is zero or above [`MAX_BODY`].
    #[error("record length {0} is out of range")]
    Length(usize),
    /// The body ends before a field does.
    #[error("record body ends inside a field")]
    Short,
    /// Bytes remain after the last field.
    #[error("{0} stray bytes after the record's fields")]
    Trailing(usize),
    /// The version byte is not [`VERSION`].
    #[error("unknown record version {0}")]
    Version(u8),
    /// An unknown tag or enum byte.
    #[error("unknown {field} value {value}")]
    Unknown {
        /// Which field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A string is longer than [`MAX_STR`] or not UTF-8.
    #[error("a string field is too long or not UTF-8")]
    Str,
}

/// What [`decode_frame`] found at the start of its input.
#[derive(Debug)]
pub enum Frame {
    /// A whole record of `len` bytes.
    Record {
        /// The record.
        record: Box<Record>,
        /// Its frame's length.
        len: usize,
    },
    /// The input ends inside a frame (a torn write at the tail).
    Incomplete,
}

/// The bytes a checkpoint at `seq`, with chain head `prev`, made at
/// `at_ms`, signs.
pub fn checkpoint_message(seq: u64, prev: &[u8; 32], at_ms: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(prev);
    m.extend_from_slice(&at_ms.to_le_bytes());
    m
}

/// SHA-256 of a frame: the next record's `prev`.
pub fn frame_hash(frame: &[u8]) -> [u8; 32] {
    Sha256::digest(frame).into()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a character boundary: a record never fails
    // to encode.
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Record {
    /// The record's frame (length prefix and body).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&[0; 4]);
        b.push(VERSION);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.prev);
        b.extend_from_slice(&self.entry.at_ms.to_le_bytes());
        b.push(match self.what {
            What::Lifecycle { .. } => 1,
            What::Credential { .. } => 2,
            What::Security { .. } => 3,
            What::Checkpoint { .. } => 4,
            What::Admin { .. } => 5,
        });
        for s in [
            &self.entry.bubble,
            &self.entry.owner,
            &self.entry.parent,
            &self.entry.portion_digest,
        ] {
            put_str(&mut b, s);
        }
        match &self.what {
            What::Lifecycle { state, reason } => {
                put_str(&mut b, state);
                put_str(&mut b, reason);
            }
            What::Credential {
                action,
                name,
                outcome,
            } => {
                b.push(match action {
                    CredentialAction::Provision => 1,
                    CredentialAction::Use => 2,
                });
                put_str(&mut b, name);
                b.push(match outcome {
                    Outcome::Ok => 1,
                    Outcome::Denied => 2,
                    Outcome::Failed => 3,
                });
            }
            What::Security { kind } => put_str(&mut b, kind),
            What::Admin { action } => put_str(&mut b, action),
            What::Checkpoint { key, signature } => {
                b.extend_from_slice(key);
                b.extend_from_slice(signature);
            }
        }
        // Eight strings of at most MAX_STR and fixed fields fit MAX_BODY.
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_le_bytes());
        b
    }
}

/// A cursor over a record body that never reads past its end.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Short);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(u16::from_le_bytes(self.array()?));
        if n > MAX_STR {
            return Err(DecodeError::Str);
        }
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Str)?;
        Ok(s.to_string())
    }
}

/// Decodes the frame at the start of `bytes`.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let Some(len) = bytes.get(..4) else {
        return Ok(Frame::Incomplete);
    };
    let mut l = [0u8; 4];
    l.copy_from_slice(len);
    let n = u32::from_le_bytes(l) as usize;
    if n == 0 || n > MAX_BODY {
        return Err(DecodeError::Length(n));
    }
    let Some(body) = bytes.get(4..4 + n) else {
        return Ok(Frame::Incomplete);
    };
    let mut r = Reader { b: body };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let seq = r.u64()?;
    let prev = r.array::<32>()?;
    let at_ms = r.u64()?;
    let tag = r.u8()?;
    let entry = Entry {
        bubble: r.str()?,
        owner: r.str()?,
        parent: r.str()?,
        portion_digest: r.str()?,
        at_ms,
    };
    let what = match tag {
        1 => What::Lifecycle {
            state: r.str()?,
            reason: r.str()?,
        },
        2 => {
            let action = match r.u8()? {
                1 => CredentialAction::Provision,
                2 => CredentialAction::Use,
                value => {
                    return Err(DecodeError::Unknown {
                        field: "action",
                        value,
                    })
                }
            };
            let name = r.str()?;
            let outcome = match r.u8()? {
                1 => Outcome::Ok,
                2 => Outcome::Denied,
                3 => Outcome::Failed,
                value => {
                    return Err(DecodeError::Unknown {
                        field: "outcome",
                        value,
                    })
                }
            };
            What::Credential {
                action,
                name,
                outcome,
            }
        }
        3 => What::Security { kind: r.str()? },
        5 => What::Admin { action: r.str()? },
        4 => What::Checkpoint {
            key: r.array()?,
            signature: r.array()?,
        },
        value => {
            return Err(DecodeError::Unknown {
                field: "tag",
                value,
            })
        }
    };
    if !r.b.is_empty() {
        return Err(DecodeError::Trailing(r.b.len()));
    }
    Ok(Frame::Record {
        record: Box::new(Record {
            seq,
            prev,
            entry,
            what,
        }),
        len: 4 + n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(what: What) -> Record {
        Record {
            seq: 7,
            prev: [9; 32],
            entry: Entry {
                bubble: "b-1".into(),
                owner: "alice".into(),
                parent: "bob".into(),
                portion_digest: "ab".into(),
                at_ms: 42,
            },
            what,
        }
    }

    #[test]
    fn every_kind_round_trips_and_every_prefix_is_incomplete() {
        for what in [
            What::Lifecycle {
                state: "READY".into(),
                reason: String::new(),
            },
            What::Credential {
                action: CredentialAction::Use,
                name: "k".into(),
                outcome: Outcome::Denied,
            },
            What::Security {
                kind: "fuel_exhausted".into(),
            },
            What::Checkpoint {
                key: [1; 32],
                signature: [2; 64],
            },
            What::Admin {
                action: "delete".into(),
            },
        ] {
            let r = sample(what);
            let f = r.encode();
            match decode_frame(&f).unwrap() {
                Frame::Record { record, len } => {
                    assert_eq!(*record, r);
                    assert_eq!(len, f.len());
                }
                Frame::Incomplete => panic!("whole frame is incomplete"),
            }
            for cut in 0..f.len() {
                assert!(matches!(decode_frame(&f[..cut]), Ok(Frame::Incomplete)));
            }
        }
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let mut r = sample(What::Security {
            kind: "é".repeat(MAX_STR),
        });
        r.entry.bubble = "x".repeat(3 * MAX_STR);
        let f = r.encode();
        let Frame::Record { record, .. } = decode_frame(&f).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(record.entry.bubble.len(), MAX_STR);
        let What::Security { kind } = record.what else {
            panic!("kind")
        };
        assert_eq!(kind.len(), MAX_STR);
    }

    #[test]
    fn bad_lengths_versions_and_tags_are_refused() {
        let f = sample(What::Security { kind: "x".into() }).encode();
        let mut g = f.clone();
        g[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode_frame(&g).unwrap_err(), DecodeError::Length(0));
        g[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_frame(&g), Err(DecodeError::Length(_))));
        let mut g = f.clone();
        g[4] = 2;
        assert_eq!(decode_frame(&g).unwrap_err(), DecodeError::Version(2));
        let mut g = f.clone();
        g[4 + 1 + 8 + 32 + 8] = 9;
        assert!(matches!(
            decode_frame(&g),
            Err(DecodeError::Unknown { field: "tag", .. })
        ));
    }
}
