//! The broker's audit log: append-only, hash-chained, fsynced, with
//! checkpoints signed by the broker's usage-signing key.
//!
//! - [`record`]: one record and its bounds-checked binary codec (fuzzed by
//!   `audit/fuzz`).
//! - [`log`]: the writer ([`AuditLog`]): a bounded channel to one thread
//!   that batches, chains, writes, fsyncs and checkpoints.
//! - [`verify`]: offline verification; a failure names the record.
//!
//! Records never carry a secret or an input: credential records name the
//! credential, never its value. See `docs/audit.md`.

pub mod log;
pub mod page;
pub mod record;
pub mod staged;
pub mod verify;
mod writer;

pub use log::{AuditError, AuditLog, CheckpointSigner, Options, Pin, PinSink, RECOVERED, RESTORED};
pub use page::{Page, STRIDE};
pub use record::{
    checkpoint_message, decode_frame, CredentialAction, DecodeError, Entry, Frame, Outcome, Record,
    What,
};
pub use staged::{PinStore, Staged};
pub use verify::{records, verify, Problem, Summary, VerifyError};

/// The checkpoint signer of the unit tests.
#[cfg(test)]
mod test_key {
    use ed25519_dalek::{Signer, SigningKey};

    use crate::log::CheckpointSigner;

    /// An Ed25519 key signing checkpoints.
    pub(crate) struct Key(pub(crate) SigningKey);

    impl CheckpointSigner for Key {
        fn public_key(&self) -> [u8; 32] {
            self.0.verifying_key().to_bytes()
        }
        fn sign(&self, msg: &[u8]) -> [u8; 64] {
            self.0.sign(msg).to_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::test_key::Key;

    fn key(b: u8) -> Arc<Key> {
        Arc::new(Key(SigningKey::from_bytes(&[b; 32])))
    }

    fn entry(i: u64) -> (Entry, What) {
        (
            Entry {
                bubble: format!("b-{i}"),
                owner: "alice".into(),
                parent: "alice".into(),
                portion_digest: String::new(),
                at_ms: 1000 + i,
            },
            What::Lifecycle {
                state: "ready".into(),
                reason: String::new(),
            },
        )
    }

    /// A security-relevant record is signed in its own write: a checkpoint
    /// follows it at once (pinned), so cutting it off the log, even when
    /// the last periodic checkpoint is long past, is refused at open,
    /// naming the pinned checkpoint. Lifecycle records alone wait for the
    /// periodic checkpoint.
    #[test]
    fn a_security_record_is_checkpointed_and_pinned_at_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (log, pins) = pinned_open(&p, None, 1000);
        let log = log.unwrap();
        let (e, w) = entry(0);
        log.append(e, w);
        log.flush().unwrap();
        assert!(pins.lock().unwrap().is_empty(), "a lifecycle record alone");
        let sec = [
            What::Security {
                kind: "foreign_access".into(),
            },
            What::Credential {
                action: CredentialAction::Use,
                name: "k".into(),
                outcome: Outcome::Denied,
            },
        ];
        for (i, what) in sec.into_iter().enumerate() {
            let (e, _) = entry(1 + i as u64);
            log.append(e, what);
            log.flush().unwrap();
        }
        let (e, w) = entry(9);
        log.append(e, w);
        log.flush().unwrap();
        // A crash: no closing checkpoint.
        std::mem::forget(log);
        let pins = pins.lock().unwrap().clone();
        // [0 lifecycle, 1 security, 2 checkpoint, 3 credential,
        //  4 checkpoint, 5 lifecycle (unsigned tail)].
        assert_eq!(pins.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![2, 4]);
        let good = std::fs::read(&p).unwrap();
        let (recs, _) = records(&good).unwrap();
        assert_eq!(recs.len(), 6);
        // Cutting the credential record and its checkpoint: refused.
        std::fs::write(&p, &good[..recs[3].0 as usize]).unwrap();
        match pinned_open(&p, pins.last().copied(), 1000).0 {
            Err(AuditError::Truncated { pinned_seq, .. }) => assert_eq!(pinned_seq, 4),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a log cut before a pinned security record opened"),
        }
    }

    fn opts(every: u64) -> Options {
        Options {
            capacity: 16,
            checkpoint_every: every,
            checkpoint_interval: Duration::from_secs(3600),
        }
    }

    fn write_log(dir: &std::path::Path, n: u64, every: u64) -> std::path::PathBuf {
        let p = dir.join("audit").join("audit.log");
        let log = AuditLog::open(&p, key(1), opts(every)).unwrap();
        for i in 0..n {
            let (e, w) = entry(i);
            log.append(e, w);
        }
        log.flush().unwrap();
        drop(log);
        p
    }

    #[test]
    fn a_written_log_verifies_with_checkpoints_and_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = write_log(d.path(), 10, 4);
        let s = verify(&std::fs::read(&p).unwrap(), Some(key(1).public_key())).unwrap();
        // 10 records, a checkpoint after each 4 and one at close.
        assert_eq!(s.records, 13);
        assert_eq!(s.checkpoints, 3);
        assert_eq!(s.unsigned_tail, 0);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        // Another key is named.
        let e = verify(&std::fs::read(&p).unwrap(), Some(key(2).public_key())).unwrap_err();
        assert!(matches!(e.problem, Problem::Key { .. }), "{e}");
    }

    #[test]
    fn reopening_continues_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let p = write_log(d.path(), 3, 100);
        let log = AuditLog::open(&p, key(1), opts(100)).unwrap();
        let (e, w) = entry(9);
        log.append(e, w);
        let all = log.read_all().unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[4].entry.bubble, "b-9");
        drop(log);
        verify(&std::fs::read(&p).unwrap(), None).unwrap();
        // A log signed by another key is not extended.
        assert!(matches!(
            AuditLog::open(&p, key(2), opts(100)),
            Err(AuditError::Broken { .. })
        ));
    }

    #[test]
    fn a_torn_tail_is_cut_on_open() {
        let d = tempfile::tempdir().unwrap();
        let p = write_log(d.path(), 3, 100);
        let good = std::fs::read(&p).unwrap();
        let mut torn = good.clone();
        torn.extend_from_slice(&good[..10]);
        std::fs::write(&p, &torn).unwrap();
        let e = verify(&torn, None).unwrap_err();
        assert_eq!((e.record, e.problem), (4, Problem::Torn(10)));
        drop(AuditLog::open(&p, key(1), opts(100)).unwrap());
        let after = std::fs::read(&p).unwrap();
        assert_eq!(&after[..good.len()], &good[..]);
        verify(&after, None).unwrap();
    }

    #[test]
    fn a_zero_filled_tail_after_a_crash_is_cut_on_open() {
        let d = tempfile::tempdir().unwrap();
        let p = write_log(d.path(), 3, 100);
        let good = std::fs::read(&p).unwrap();
        let mut zeros = good.clone();
        zeros.extend_from_slice(&[0u8; 8192]);
        std::fs::write(&p, &zeros).unwrap();
        // Offline it is a torn tail (said, not hidden)...
        let e = verify(&zeros, None).unwrap_err();
        assert_eq!(e.problem, Problem::Torn(8192));
        // ...and the broker starts, cutting it, the chain intact.
        drop(AuditLog::open(&p, key(1), opts(100)).unwrap());
        let after = std::fs::read(&p).unwrap();
        assert_eq!(&after[..good.len()], &good[..]);
        verify(&after, None).unwrap();
    }

    /// Every single-byte change of every record is detected and names the
    /// record changed (a checkpoint closes the log, so the last record is
    /// covered too).
    #[test]
    fn every_one_byte_edit_is_detected_and_names_its_record() {
        let d = tempfile::tempdir().unwrap();
        let p = write_log(d.path(), 5, 100);
        let bytes = std::fs::read(&p).unwrap();
        let (recs, _) = records(&bytes).unwrap();
        for (i, (off, _, _)) in recs.iter().enumerate() {
            let end = recs.get(i + 1).map_or(bytes.len() as u64, |r| r.0);
            for at in *off..end {
                let mut b = bytes.clone();
                b[at as usize] ^= 0x01;
                match verify(&b, None) {
                    Err(e) => assert_eq!(e.record, i as u64, "byte {at}: {e}"),
                    Ok(s) => panic!("byte {at} of record {i} changed, verify passed: {s:?}"),
                }
            }
        }
    }

    /// What `append` costs its caller (the call path): printed as
    /// p50/p99 over 20,000 appends, with the writer fsyncing behind.
    #[test]
    fn append_costs_the_caller_microseconds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let log = AuditLog::open(&p, key(1), Options::default()).unwrap();
        let mut ns: Vec<u128> = (0..20_000u64)
            .map(|i| {
                let (e, w) = entry(i);
                let t = std::time::Instant::now();
                log.append(e, w);
                t.elapsed().as_nanos()
            })
            .collect();
        log.flush().unwrap();
        ns.sort_unstable();
        let (p50, p99) = (ns[ns.len() / 2], ns[ns.len() * 99 / 100]);
        eprintln!("audit append: p50 {p50} ns, p99 {p99} ns");
        // Generous for an unoptimized build on a shared machine.
        assert!(p50 < 10_000, "p50 {p50} ns");
    }

    type Pins = Arc<std::sync::Mutex<Vec<Pin>>>;

    fn pinned_open(
        p: &std::path::Path,
        pin: Option<Pin>,
        every: u64,
    ) -> (Result<AuditLog, AuditError>, Pins) {
        let pins: Pins = Default::default();
        let sink = pins.clone();
        let log = AuditLog::open_pinned(
            p,
            key(1),
            opts(every),
            pin,
            Box::new(move |p| sink.lock().unwrap().push(p)),
        );
        (log, pins)
    }

    /// Each durable checkpoint is reported; a log cut back to any whole
    /// record before the last pinned checkpoint (to an earlier checkpoint,
    /// between records, to nothing), or replaced by another log, is
    /// refused at open naming the pinned checkpoint; a longer log opens.
    #[test]
    fn a_log_cut_back_before_its_pinned_checkpoint_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (log, pins) = pinned_open(&p, None, 3);
        let log = log.unwrap();
        for i in 0..9 {
            let (e, w) = entry(i);
            log.append(e, w);
        }
        log.flush().unwrap();
        drop(log);
        let pins = pins.lock().unwrap().clone();
        // Checkpoints after records 3, 6, 9 (seq 3, 7, 11; the last one
        // fills its batch, so the close adds none); a batch holding more
        // than one reports its last.
        assert!(pins.windows(2).all(|w| w[0].seq < w[1].seq), "{pins:?}");
        assert_eq!(pins.last().map(|p| p.seq), Some(11));
        let last = *pins.last().unwrap();
        let good = std::fs::read(&p).unwrap();
        let (recs, _) = records(&good).unwrap();
        let cut_at = |n: usize| recs.get(n).map_or(good.len(), |r| r.0 as usize);
        // Back to the second checkpoint (whole, valid, signed), between
        // records, to the first record, to nothing.
        for n in [8usize, 7, 5, 1, 0] {
            std::fs::write(&p, &good[..cut_at(n)]).unwrap();
            // Without a pin it opens (what the pin is for)...
            if n > 0 {
                verify(&good[..cut_at(n)], None).unwrap();
            }
            // ...with it, refused.
            match pinned_open(&p, Some(last), 3).0 {
                Err(AuditError::Truncated {
                    pinned_seq,
                    records: r,
                    ..
                }) => assert_eq!((pinned_seq, r), (11, n as u64)),
                Err(e) => panic!("cut to {n} records: {e}"),
                Ok(_) => panic!("a log cut to {n} records opened"),
            }
        }
        // Another log of the same length, or longer, signed by the same key.
        std::fs::remove_file(&p).unwrap();
        let (other, _) = pinned_open(&p, None, 3);
        let other = other.unwrap();
        for i in 100..112 {
            let (e, w) = entry(i);
            other.append(e, w);
        }
        drop(other);
        assert!(matches!(
            pinned_open(&p, Some(last), 3).0,
            Err(AuditError::Truncated { .. })
        ));
        // The whole log, and one that grew since, open.
        std::fs::write(&p, &good).unwrap();
        let (log, _) = pinned_open(&p, Some(last), 3);
        let log = log.unwrap();
        let (e, w) = entry(50);
        log.append(e, w);
        drop(log);
        pinned_open(&p, Some(last), 3).0.unwrap();
    }

    /// Records a crash left unsigned are marked recovered and signed at
    /// the next open, before anything else is written.
    #[test]
    fn an_unsigned_tail_is_marked_recovered_and_signed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (log, _) = pinned_open(&p, None, 100);
        let log = log.unwrap();
        for i in 0..3 {
            let (e, w) = entry(i);
            log.append(e, w);
        }
        log.flush().unwrap();
        // A crash: the writer never gets to sign them.
        std::mem::forget(log);
        let s = verify(&std::fs::read(&p).unwrap(), None).unwrap();
        assert_eq!((s.records, s.unsigned_tail), (3, 3));
        let (log, pins) = pinned_open(&p, None, 100);
        let log = log.unwrap();
        assert_eq!(
            pins.lock()
                .unwrap()
                .iter()
                .map(|p| p.seq)
                .collect::<Vec<_>>(),
            vec![4]
        );
        let all = log.read_all().unwrap();
        assert_eq!(all.len(), 5);
        assert!(
            matches!(&all[3].what, What::Lifecycle { state, reason }
                if state == RECOVERED && reason.starts_with("3 records")),
            "{:?}",
            all[3]
        );
        assert!(matches!(all[4].what, What::Checkpoint { .. }));
        drop(log);
        let s = verify(&std::fs::read(&p).unwrap(), Some(key(1).public_key())).unwrap();
        assert_eq!(s.unsigned_tail, 0);
    }

    /// A signer that waits for a go-ahead before each signature: stalls
    /// the writer (it signs checkpoints) like a disk that does not answer.
    struct Stalled(SigningKey, std::sync::Mutex<std::sync::mpsc::Receiver<()>>);
    impl CheckpointSigner for Stalled {
        fn public_key(&self) -> [u8; 32] {
            self.0.verifying_key().to_bytes()
        }
        fn sign(&self, msg: &[u8]) -> [u8; 64] {
            let _ = self.1.lock().unwrap().recv();
            self.0.sign(msg).to_bytes()
        }
    }

    /// With the writer stalled and the queue full, a task appending on the
    /// only worker of a multi-threaded runtime waits, but the runtime's
    /// other tasks still run; once the writer moves on, every record is
    /// written (none dropped).
    #[test]
    fn a_full_queue_never_stalls_the_runtime_nor_drops_records() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let (go, wait) = std::sync::mpsc::channel();
        let signer = Arc::new(Stalled(
            SigningKey::from_bytes(&[1; 32]),
            std::sync::Mutex::new(wait),
        ));
        let o = Options {
            capacity: 1,
            checkpoint_every: 1,
            checkpoint_interval: Duration::from_secs(3600),
        };
        let log = Arc::new(AuditLog::open(&p, signer, o).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let appender = {
            let log = log.clone();
            rt.spawn(async move {
                for i in 0..20 {
                    let (e, w) = entry(i);
                    log.append(e, w);
                }
            })
        };
        // Another task on the same (only) worker gets to run while the
        // appender waits for room (observed from this thread, which is not
        // a worker).
        let (ran, seen) = std::sync::mpsc::channel();
        rt.spawn(async move { ran.send(7).unwrap() });
        let got = seen.recv_timeout(Duration::from_secs(10));
        let queue_filled = !appender.is_finished();
        // The writer moves on (also on failure, so that the runtime can
        // stop): every record lands.
        let release = std::thread::spawn(move || {
            while go.send(()).is_ok() {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert_eq!(got, Ok(7), "the runtime stalled behind a full audit queue");
        assert!(
            queue_filled,
            "the queue never filled: the test proves nothing"
        );
        rt.block_on(appender).unwrap();
        log.flush().unwrap();
        let recs = log.read_all().unwrap();
        let data = recs
            .iter()
            .filter(|r| !matches!(r.what, What::Checkpoint { .. }))
            .count();
        assert_eq!(data, 20);
        assert_eq!(log.lost(), 0);
        drop(rt);
        drop(log);
        let _ = release.join();
    }
}
