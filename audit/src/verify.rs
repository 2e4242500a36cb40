//! Offline verification of an audit log: the chain, the sequence numbers
//! and every checkpoint's signature; a failure names the record.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;

use crate::record::{
    checkpoint_message, decode_frame, frame_hash, DecodeError, Frame, Record, What,
};

/// What a log that verifies holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records, checkpoints included.
    pub records: u64,
    /// Signed checkpoints.
    pub checkpoints: u64,
    /// Records after the last checkpoint (chained but not yet signed: a
    /// change to them and their successors together, or their removal,
    /// is not detected).
    pub unsigned_tail: u64,
    /// The checkpoints' public key, hex (empty if none).
    pub key: String,
    /// Whether that key was the one the caller asked for (`false`: no key
    /// was given, and the first checkpoint's key was trusted).
    pub key_checked: bool,
    /// `recovered` marks: each says that records written before a crash
    /// were found unsigned at the next start and signed only then.
    pub recovered: u64,
}

/// Why a log does not verify: the record (by sequence position) and its
/// byte offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record {record} (byte offset {offset}): {problem}")]
pub struct VerifyError {
    /// The record at fault, counted from 0.
    pub record: u64,
    /// Where its frame starts in the file.
    pub offset: u64,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// It does not decode.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// Its sequence number is not its position.
    #[error(
        "sequence number {found} where {expected} belongs (edited, removed or inserted record)"
    )]
    Sequence {
        /// The number in the record.
        found: u64,
        /// Its position.
        expected: u64,
    },
    /// Its bytes changed: the next record's chain hash does not match it.
    #[error("its contents were altered: the next record's chain hash does not match")]
    Altered,
    /// Its own chain hash was changed.
    #[error("its chain hash was altered")]
    Link,
    /// The last record's link does not match the record before it.
    #[error("its chain hash does not match the record before it (either was altered)")]
    Unlinked,
    /// A checkpoint's signature does not verify.
    #[error("checkpoint signature does not verify")]
    Signature,
    /// The file ends inside this record: a crash in the middle of a write
    /// (the broker cuts it when it next opens the log), or a cut or edit.
    #[error("the file ends inside this record ({0} bytes of it)")]
    Torn(u64),
    /// A checkpoint carries facts that only other records carry.
    #[error("checkpoint with a bubble, owner, parent or portion")]
    CheckpointFields,
    /// A checkpoint is signed by another key than the expected one.
    #[error("checkpoint signed by key {found}, expected {expected}")]
    Key {
        /// The key in the checkpoint, hex.
        found: String,
        /// The key expected, hex.
        expected: String,
    },
}

/// A decoded record with its frame's offset and hash.
pub type Located = (u64, Record, [u8; 32]);

/// Decodes every whole record of a log, in order, with its frame's offset
/// and hash; stops at a torn tail (returned as its byte count).
pub fn records(bytes: &[u8]) -> Result<(Vec<Located>, u64), VerifyError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let index = out.len() as u64;
        match decode_frame(rest) {
            Ok(Frame::Record { record, len }) => {
                out.push((off as u64, *record, frame_hash(&rest[..len])));
                off += len;
            }
            Ok(Frame::Incomplete) => return Ok((out, rest.len() as u64)),
            // A crash can leave the file extended with zeros past the last
            // record written (the size reached the disk, the data not):
            // a torn tail, not a broken record.
            Err(_) if rest.iter().all(|&b| b == 0) => return Ok((out, rest.len() as u64)),
            Err(e) => {
                return Err(VerifyError {
                    record: index,
                    offset: off as u64,
                    problem: Problem::Malformed(e),
                })
            }
        }
    }
    Ok((out, 0))
}

/// Checks a checkpoint's signature over its own fields.
fn signed(key: &[u8; 32], signature: &[u8; 64], r: &Record) -> Result<(), ()> {
    let vk = VerifyingKey::from_bytes(key).map_err(|_| ())?;
    vk.verify_strict(
        &checkpoint_message(r.seq, &r.prev, r.entry.at_ms),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| ())
}

/// Verifies a whole log. With `key`, every checkpoint must be signed by
/// it; without, by one key (the first checkpoint's).
pub fn verify(bytes: &[u8], key: Option<[u8; 32]>) -> Result<Summary, VerifyError> {
    let (recs, torn) = records(bytes)?;
    if torn > 0 {
        return Err(VerifyError {
            record: recs.len() as u64,
            offset: bytes.len() as u64 - torn,
            problem: Problem::Torn(torn),
        });
    }
    let mut s = Summary::default();
    let mut expected_key = key;
    let mut last_checkpoint = None;
    for (i, (off, r, _)) in recs.iter().enumerate() {
        if matches!(&r.what, What::Lifecycle { state, .. } if state == crate::log::RECOVERED)
            && r.entry.bubble.is_empty()
        {
            s.recovered += 1;
        }
        let at = |problem| VerifyError {
            record: i as u64,
            offset: *off,
            problem,
        };
        if r.seq != i as u64 {
            return Err(at(Problem::Sequence {
                found: r.seq,
                expected: i as u64,
            }));
        }
        let want_prev = if i == 0 { [0u8; 32] } else { recs[i - 1].2 };
        if r.prev != want_prev {
            // A content change in record i-1 breaks only record i's link;
            // a change to record i's own link also breaks its successor's
            // link, or its signature if it is a checkpoint.
            let intact = match (&r.what, recs.get(i + 1)) {
                (What::Checkpoint { key, signature }, _) => Some(signed(key, signature, r).is_ok()),
                (_, Some(next)) => Some(next.1.prev == recs[i].2),
                (_, None) => None,
            };
            return Err(match (intact, i.checked_sub(1)) {
                (Some(true), Some(before)) => VerifyError {
                    record: before as u64,
                    offset: recs[before].0,
                    problem: Problem::Altered,
                },
                (Some(_), _) | (None, None) => at(Problem::Link),
                (None, Some(_)) => at(Problem::Unlinked),
            });
        }
        if let What::Checkpoint { key: k, signature } = &r.what {
            let e = &r.entry;
            if !(e.bubble.is_empty()
                && e.owner.is_empty()
                && e.parent.is_empty()
                && e.portion_digest.is_empty())
            {
                return Err(at(Problem::CheckpointFields));
            }
            let want = *expected_key.get_or_insert(*k);
            if *k != want {
                return Err(at(Problem::Key {
                    found: hex::encode(k),
                    expected: hex::encode(want),
                }));
            }
            signed(k, signature, r).map_err(|()| at(Problem::Signature))?;
            s.checkpoints += 1;
            last_checkpoint = Some(i as u64);
        }
    }
    s.records = recs.len() as u64;
    s.unsigned_tail = match last_checkpoint {
        Some(c) => s.records - c - 1,
        None => s.records,
    };
    s.key = expected_key.map(hex::encode).unwrap_or_default();
    s.key_checked = key.is_some();
    Ok(s)
}
