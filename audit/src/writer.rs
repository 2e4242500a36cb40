//! The writer thread: chains, writes and fsyncs batches, signs checkpoints
//! and stages each checkpointed batch outside the log before writing it.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use crate::log::{chain_tail, CheckpointSigner, Msg, Options, Pin};
use crate::record::{checkpoint_message, frame_hash, Entry, Record, What};
use crate::staged::{PinStore, Staged};
use crate::verify::records;

pub(crate) struct Writer {
    pub(crate) index: crate::page::Index,
    /// Offsets of indexed records in the batch being written.
    pub(crate) pending_index: Vec<u64>,
    pub(crate) store: Box<dyn PinStore>,
    /// A checkpoint in the batch being written, pinned once it is durable.
    pub(crate) pending_pin: Option<Pin>,
    /// The last checkpoint durable in the log.
    pub(crate) durable: Option<Pin>,
    /// The sequence number of the first record of the batch being built.
    pub(crate) batch_from: u64,
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
    pub(crate) seq: u64,
    pub(crate) head: [u8; 32],
    pub(crate) unsigned: u64,
    pub(crate) oldest_unsigned: Option<Instant>,
    pub(crate) signer: Arc<dyn CheckpointSigner>,
    pub(crate) opts: Options,
    pub(crate) lost: Arc<AtomicU64>,
}

/// Crash tests (feature `fault-injection`): the process dies at `point`
/// when `BUBBLED_TEST_FAIL` names it (`audit.die_after_stage`: a
/// checkpointed batch staged, not yet in the log; `audit.die_after_fsync`:
/// in the log, its pin not yet moved).
#[cfg(feature = "fault-injection")]
fn die_at(point: &str) {
    if std::env::var("BUBBLED_TEST_FAIL").is_ok_and(|s| s.split(',').any(|p| p == point)) {
        tracing::warn!(point, "fault point: dying");
        std::process::abort();
    }
}

impl Writer {
    pub(crate) fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let first = match rx.recv_timeout(self.opts.checkpoint_interval) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut buf = Vec::new();
            let mut flushes = Vec::new();
            let mut sign = false;
            let mut take = |m: Msg, buf: &mut Vec<u8>, w: &mut Writer| match m {
                Msg::Entry(e, what) => {
                    sign |= what.checkpoint_at_once();
                    w.push(buf, e, what)
                }
                Msg::Flush(done, s) => {
                    sign |= s;
                    flushes.push(done)
                }
            };
            if let Some(m) = first {
                take(m, &mut buf, self);
                // Everything already queued goes in the same write.
                while let Ok(m) = rx.try_recv() {
                    take(m, &mut buf, self);
                    if buf.len() > 1 << 20 {
                        break;
                    }
                }
            }
            let due = self
                .oldest_unsigned
                .is_some_and(|t| t.elapsed() >= self.opts.checkpoint_interval);
            if self.unsigned > 0 && (sign || due || self.unsigned >= self.opts.checkpoint_every) {
                self.checkpoint(&mut buf);
            }
            self.write(&buf);
            for f in flushes {
                let _ = f.send(());
            }
        }
        let mut buf = Vec::new();
        if self.unsigned > 0 {
            self.checkpoint(&mut buf);
        }
        self.write(&buf);
    }

    /// Notes the offset of the record about to be added to `buf`, if it
    /// is one the index keeps.
    fn note_offset(&mut self, buf: &[u8]) {
        if self.seq.is_multiple_of(crate::page::STRIDE) {
            self.pending_index.push(self.len + buf.len() as u64);
        }
    }

    pub(crate) fn push(&mut self, buf: &mut Vec<u8>, entry: Entry, what: What) {
        self.note_offset(buf);
        let frame = Record {
            seq: self.seq,
            prev: self.head,
            entry,
            what,
        }
        .encode();
        self.head = frame_hash(&frame);
        self.seq += 1;
        buf.extend_from_slice(&frame);
        self.unsigned += 1;
        self.oldest_unsigned.get_or_insert_with(Instant::now);
        if self.unsigned >= self.opts.checkpoint_every {
            self.checkpoint(buf);
        }
    }

    pub(crate) fn checkpoint(&mut self, buf: &mut Vec<u8>) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let signature = self
            .signer
            .sign(&checkpoint_message(self.seq, &self.head, at_ms));
        let what = What::Checkpoint {
            key: self.signer.public_key(),
            signature,
        };
        self.note_offset(buf);
        let frame = Record {
            seq: self.seq,
            prev: self.head,
            entry: Entry {
                at_ms,
                ..Entry::default()
            },
            what,
        }
        .encode();
        self.head = frame_hash(&frame);
        self.pending_pin = Some(Pin {
            seq: self.seq,
            hash: self.head,
        });
        self.seq += 1;
        buf.extend_from_slice(&frame);
        self.unsigned = 0;
        self.oldest_unsigned = None;
    }

    /// Appends `buf` and fsyncs. On an error the file is cut back to its
    /// last good length and the chain head rewound, so the records of this
    /// batch are lost (counted) but the chain stays whole.
    pub(crate) fn write(&mut self, buf: &[u8]) {
        if buf.is_empty() {
            return;
        }
        // Write-ahead: a batch holding a checkpoint is kept outside the log
        // before the log gets it.
        if let Some(pin) = self.pending_pin {
            let batch = Staged {
                from_seq: self.batch_from,
                pin,
                bytes: buf.to_vec(),
            };
            self.store.stage(self.durable, Some(&batch));
        }
        #[cfg(feature = "fault-injection")]
        if self.pending_pin.is_some() {
            die_at("audit.die_after_stage");
        }
        let r = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        #[cfg(feature = "fault-injection")]
        if self.pending_pin.is_some() {
            die_at("audit.die_after_fsync");
        }
        match r {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.batch_from = self.seq;
                self.index.extend(self.pending_index.drain(..));
                if let Some(pin) = self.pending_pin.take() {
                    self.store.pinned(pin);
                    self.durable = Some(pin);
                }
            }
            Err(e) => {
                if self.pending_pin.is_some() {
                    self.store.stage(self.durable, None);
                }
                self.pending_pin = None;
                self.pending_index.clear();
                tracing::error!(path = %self.path.display(), error = %e, "audit log write failed");
                let _ = self.file.set_len(self.len);
                self.rewind();
                let n = crate::verify::records(buf)
                    .map(|(r, _)| r.len() as u64)
                    .unwrap_or(0);
                self.lost.fetch_add(n, Ordering::Relaxed);
                self.batch_from = self.seq;
            }
        }
    }

    /// Re-reads the chain head from the file (after a failed write).
    fn rewind(&mut self) {
        if let Ok(bytes) = std::fs::read(&self.path) {
            if let Ok((recs, _)) = records(&bytes) {
                (self.seq, self.head, self.unsigned) = chain_tail(&recs);
            }
        }
    }
}
