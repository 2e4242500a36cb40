//! Write-ahead staging of checkpointed batches outside the log.
//!
//! Before the writer appends a batch that holds a checkpoint (every batch
//! with a security-relevant record, and the periodic ones), it hands the
//! whole batch to a [`PinStore`] (the broker's registry), together with the
//! last checkpoint already durable in the log. At open, a log that lacks
//! some or all of the staged batch (a crash between the staging and the
//! log's fsync, or a cut while the broker was down) gets the missing
//! records back from the store, byte for byte; a log holding other records
//! where the staged ones belong is refused. So a record that was staged is
//! never silently lost, and a pin never lags behind what the log held.

use std::path::Path;

use crate::log::{AuditError, Pin};
use crate::record::What;
use crate::verify::{records, Located};

/// A batch holding a checkpoint, kept outside the log before it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Sequence number of its first record.
    pub from_seq: u64,
    /// Its last checkpoint.
    pub pin: Pin,
    /// Its frames, exactly as they are appended to the log.
    pub bytes: Vec<u8>,
}

impl Staged {
    /// The stored form: `from_seq`, the pin's seq and hash, the frames.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.bytes.len());
        v.extend_from_slice(&self.from_seq.to_le_bytes());
        v.extend_from_slice(&self.pin.seq.to_le_bytes());
        v.extend_from_slice(&self.pin.hash);
        v.extend_from_slice(&self.bytes);
        v
    }

    /// [`Staged::encode`] back (`None`: too short to be one).
    pub fn decode(v: &[u8]) -> Option<Self> {
        let (from, rest) = v.split_first_chunk::<8>()?;
        let (seq, rest) = rest.split_first_chunk::<8>()?;
        let (hash, bytes) = rest.split_first_chunk::<32>()?;
        Some(Self {
            from_seq: u64::from_le_bytes(*from),
            pin: Pin {
                seq: u64::from_le_bytes(*seq),
                hash: *hash,
            },
            bytes: bytes.to_vec(),
        })
    }
}

/// Where the writer keeps its pin and staged batch (the broker's registry).
pub trait PinStore: Send + 'static {
    /// Before `batch` is written (durable when this returns): keep it and
    /// `durable`, the last checkpoint already durable in the log. With no
    /// batch: forget the staged one (its write failed, or at open once the
    /// log holds all of it) and pin `durable`.
    fn stage(&self, durable: Option<Pin>, batch: Option<&Staged>);
    /// A checkpoint is durable in the log.
    fn pinned(&self, pin: Pin);
}

/// A [`PinStore`] that only reports durable checkpoints (no staging).
pub(crate) struct SinkOnly(pub(crate) crate::log::PinSink);

impl PinStore for SinkOnly {
    fn stage(&self, _: Option<Pin>, _: Option<&Staged>) {}
    fn pinned(&self, pin: Pin) {
        (self.0)(pin)
    }
}

/// The bytes to append so that the log (`recs`, the whole records of
/// `bytes`) holds all of `staged`: empty when it already does. Refuses a
/// staged batch that is damaged and a log that lacks records before it or
/// holds other records where it belongs.
pub(crate) fn missing_tail(
    path: &Path,
    recs: &[Located],
    staged: &Staged,
) -> Result<Vec<u8>, AuditError> {
    let refuse = |detail: &'static str| AuditError::Truncated {
        path: path.to_path_buf(),
        pinned_seq: staged.pin.seq,
        records: recs.len() as u64,
        detail,
    };
    let frames = match records(&staged.bytes) {
        Ok((f, 0)) if !f.is_empty() => f,
        _ => return Err(refuse(" and the registry's staged batch does not decode")),
    };
    let ends_well = frames.iter().any(|(_, r, h)| {
        r.seq == staged.pin.seq
            && *h == staged.pin.hash
            && matches!(r.what, What::Checkpoint { .. })
    });
    let contiguous = frames
        .iter()
        .enumerate()
        .all(|(i, (_, r, _))| r.seq == staged.from_seq + i as u64);
    if !ends_well || !contiguous {
        return Err(refuse(" and the registry's staged batch is inconsistent"));
    }
    let have = recs.len() as u64;
    if have < staged.from_seq {
        return Err(refuse(" (records before the staged batch are missing)"));
    }
    let from = usize::try_from(staged.from_seq).map_err(|_| refuse(""))?;
    let overlap = recs[from..].iter().zip(frames.iter());
    if overlap.clone().any(|((_, _, a), (_, _, b))| a != b) {
        return Err(refuse(" and other records where the staged batch was"));
    }
    let held = recs.len() - from;
    Ok(match frames.get(held) {
        Some((off, _, _)) => staged.bytes[*off as usize..].to_vec(),
        None => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::log::{AuditLog, Options, RESTORED};
    use crate::record::{Entry, What};
    use crate::verify::verify;

    use crate::test_key::Key;

    /// The registry, in memory: the pin and the staged batch.
    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<(Option<Pin>, Option<Staged>)>>);
    impl PinStore for Mem {
        fn stage(&self, durable: Option<Pin>, batch: Option<&Staged>) {
            let mut m = self.0.lock().unwrap();
            if let Some(d) = durable {
                if m.0.is_none_or(|p| p.seq <= d.seq) {
                    m.0 = Some(d);
                }
            }
            m.1 = batch.cloned();
        }
        fn pinned(&self, _: Pin) {}
    }

    fn open(p: &Path, mem: &Mem) -> Result<AuditLog, AuditError> {
        let (pin, staged) = mem.0.lock().unwrap().clone();
        let key = Arc::new(Key(SigningKey::from_bytes(&[1; 32])));
        let opts = Options {
            capacity: 64,
            checkpoint_every: 1000,
            checkpoint_interval: std::time::Duration::from_secs(3600),
        };
        AuditLog::open_staged(p, key, opts, pin, staged, Box::new(mem.clone()))
    }

    fn security(i: u64) -> (Entry, What) {
        (
            Entry {
                bubble: format!("b-{i}"),
                owner: "alice".into(),
                parent: "mallory".into(),
                portion_digest: String::new(),
                at_ms: 1000 + i,
            },
            What::Security {
                kind: "foreign_access".into(),
            },
        )
    }

    /// Writes two lifecycle records, then a security record (a checkpoint
    /// at once, staged before its write); returns the log's bytes and the
    /// store.
    fn written(p: &Path) -> (Vec<u8>, Mem) {
        let mem = Mem::default();
        let log = open(p, &mem).unwrap();
        for i in 0..2 {
            log.append(
                Entry::default(),
                What::Lifecycle {
                    state: format!("s{i}"),
                    reason: String::new(),
                },
            );
        }
        log.checkpoint().unwrap();
        let (e, w) = security(7);
        log.append(e, w);
        log.flush().unwrap();
        // A crash: no final checkpoint.
        std::mem::forget(log);
        (std::fs::read(p).unwrap(), mem)
    }

    /// A staged batch the log lacks, wholly or in part (a crash before or
    /// during its write, or a cut while the broker was down), is appended
    /// back at open, byte for byte, marked `restored`, signed and pinned;
    /// a log that already holds it just pins it.
    #[test]
    fn a_staged_batch_missing_from_the_log_is_restored_at_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (good, mem) = written(&p);
        let (recs, _) = records(&good).unwrap();
        let staged = mem.0.lock().unwrap().1.clone().unwrap();
        assert_eq!(staged.from_seq, 3, "the security record and its checkpoint");
        assert_eq!(mem.0.lock().unwrap().0.map(|p| p.seq), Some(2));
        let start = recs[3].0 as usize;
        // Cut before the batch, after its first record, mid-record (torn).
        for cut in [start, recs[4].0 as usize, recs[4].0 as usize + 5] {
            std::fs::write(&p, &good[..cut]).unwrap();
            let m = Mem(Arc::new(Mutex::new(mem.0.lock().unwrap().clone())));
            let log = open(&p, &m).unwrap();
            let all = log.read_all().unwrap();
            drop(log);
            let now = std::fs::read(&p).unwrap();
            assert_eq!(&now[..good.len()], &good[..], "restored byte for byte");
            assert!(
                all.iter()
                    .any(|r| matches!(&r.what, What::Lifecycle { state, .. }
                    if state == RESTORED)),
                "{all:?}"
            );
            verify(&now, None).unwrap();
            // Pinned: the restored checkpoint at once, then the one that
            // signs the `restored` mark (staged until the next open).
            let (pin, st) = m.0.lock().unwrap().clone();
            assert!(pin.is_some_and(|p| p.seq >= staged.pin.seq), "{pin:?}");
            assert!(st.is_some_and(|s| s.from_seq == 5));
        }
        // A log that holds it: nothing appended, the pin moves to it.
        std::fs::write(&p, &good).unwrap();
        let m = Mem(Arc::new(Mutex::new(mem.0.lock().unwrap().clone())));
        drop(open(&p, &m).unwrap());
        assert_eq!(m.0.lock().unwrap().0, Some(staged.pin));
        assert!(m.0.lock().unwrap().1.is_none());
        assert_eq!(std::fs::read(&p).unwrap().len(), good.len());
    }

    /// Other records where the staged ones belong, or records missing
    /// before the staged batch, refuse the open.
    #[test]
    fn a_log_that_contradicts_the_staged_batch_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (good, mem) = written(&p);
        let (recs, _) = records(&good).unwrap();
        // Records before the batch (after the pin) cut away.
        std::fs::write(&p, &good[..recs[2].0 as usize]).unwrap();
        // (the pin is at seq 2, so this is already refused by it; cut the
        // pin away to see the staged check alone)
        let (_, staged) = mem.0.lock().unwrap().clone();
        let only_staged = Mem(Arc::new(Mutex::new((None, staged.clone()))));
        assert!(matches!(
            open(&p, &only_staged),
            Err(AuditError::Truncated { .. })
        ));
        // Another record in the batch's place (a valid, signed log).
        std::fs::write(&p, &good[..recs[3].0 as usize]).unwrap();
        {
            let other = open(&p, &Mem::default()).unwrap();
            let (e, w) = security(99);
            other.append(e, w);
            other.flush().unwrap();
        }
        let m = Mem(Arc::new(Mutex::new(mem.0.lock().unwrap().clone())));
        match open(&p, &m) {
            Err(AuditError::Truncated { detail, .. }) => {
                assert!(detail.contains("other records"), "{detail}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
