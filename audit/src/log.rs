//! The writer: records go through a bounded channel to one thread that
//! chains, writes and fsyncs them in batches, and signs a checkpoint every
//! `checkpoint_every` records or `checkpoint_interval`, whichever is first,
//! and in every write that holds a security-relevant record
//! ([`What::checkpoint_at_once`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::record::{checkpoint_message, frame_hash, Entry, Record, What};
use crate::verify::{records, VerifyError};

/// Signs checkpoints (the broker's usage-signing key).
pub trait CheckpointSigner: Send + Sync + 'static {
    /// The Ed25519 public key.
    fn public_key(&self) -> [u8; 32];
    /// An Ed25519 signature over `msg`.
    fn sign(&self, msg: &[u8]) -> [u8; 64];
}

/// How the writer batches and checkpoints.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Records queued before `append` waits for the writer.
    pub capacity: usize,
    /// A checkpoint after at most this many records…
    pub checkpoint_every: u64,
    /// …or when records have waited this long for one.
    pub checkpoint_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            capacity: 8192,
            checkpoint_every: 1024,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// Why the log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file or its directory failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The existing log does not verify; the broker will not extend it.
    #[error("audit log {path} is damaged ({source}); move it aside and run `bubblectl audit verify` on it")]
    Broken {
        /// The file.
        path: PathBuf,
        /// Where and how.
        source: VerifyError,
    },
    /// The writer thread has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
    /// Records were lost to a write error (counted since start).
    #[error("{0} audit records could not be written")]
    Lost(u64),
    /// A record read by a page is not the one the index placed there.
    #[error("audit index: record {found} where {expected} was expected")]
    Misindexed {
        /// The sequence number the index promised.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// The log does not reach the checkpoint pinned outside it (the
    /// broker's registry): it was truncated, replaced or deleted.
    #[error(
        "audit log {path} was truncated or replaced: the registry pins checkpoint {pinned_seq}, \
         but the log holds {records} records{detail}; restore the log from a backup \
         (the broker will not extend a log that lost signed records)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The pinned checkpoint's sequence number.
        pinned_seq: u64,
        /// Whole records in the log.
        records: u64,
        /// What is found at the pinned position, if anything.
        detail: &'static str,
    },
}

/// The last checkpoint written and fsynced: its sequence number and the
/// SHA-256 of its frame. Kept outside the log (the broker's registry) so
/// that a log cut back to an earlier point, even to an earlier checkpoint,
/// is refused at open ([`AuditLog::open_pinned`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The checkpoint's sequence number.
    pub seq: u64,
    /// SHA-256 of its whole frame.
    pub hash: [u8; 32],
}

/// Called by the writer thread with each checkpoint once it is durable.
pub type PinSink = Box<dyn Fn(Pin) + Send>;

/// The `state` of the lifecycle record written, before a checkpoint, when
/// a log is opened with records after its last checkpoint (a crash before
/// they were signed); its reason says how many.
pub const RECOVERED: &str = "recovered";

/// Checks that `recs` reach `pin`: a checkpoint at `pin.seq` whose frame
/// hashes to `pin.hash`.
fn check_pin(path: &Path, recs: &[crate::verify::Located], pin: Pin) -> Result<(), AuditError> {
    let truncated = |detail| AuditError::Truncated {
        path: path.to_path_buf(),
        pinned_seq: pin.seq,
        records: recs.len() as u64,
        detail,
    };
    let Some((_, r, h)) = usize::try_from(pin.seq).ok().and_then(|i| recs.get(i)) else {
        return Err(truncated(""));
    };
    if !matches!(r.what, What::Checkpoint { .. }) || *h != pin.hash {
        return Err(truncated(
            " and another record where the pinned checkpoint was",
        ));
    }
    Ok(())
}

enum Msg {
    Entry(Entry, What),
    /// Acknowledge once written; with `true`, sign a checkpoint first.
    Flush(SyncSender<()>, bool),
}

/// The append-only audit log of one broker.
pub struct AuditLog {
    index: crate::page::Index,
    tx: Option<SyncSender<Msg>>,
    path: PathBuf,
    lost: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
}

struct Writer {
    index: crate::page::Index,
    /// Offsets of indexed records in the batch being written.
    pending_index: Vec<u64>,
    pin_sink: PinSink,
    /// A checkpoint in the batch being written, pinned once it is durable.
    pending_pin: Option<Pin>,
    file: File,
    path: PathBuf,
    len: u64,
    seq: u64,
    head: [u8; 32],
    unsigned: u64,
    oldest_unsigned: Option<Instant>,
    signer: Arc<dyn CheckpointSigner>,
    opts: Options,
    lost: Arc<AtomicU64>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The next sequence number, the chain head and the records since the
/// last checkpoint, of a decoded log.
fn chain_tail(recs: &[crate::verify::Located]) -> (u64, [u8; 32], u64) {
    let unsigned = recs
        .iter()
        .rev()
        .take_while(|(_, r, _)| !matches!(r.what, What::Checkpoint { .. }))
        .count() as u64;
    match recs.last() {
        Some((_, r, h)) => (r.seq + 1, *h, unsigned),
        None => (0, [0u8; 32], 0),
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, in a 0700 directory as a
    /// 0600 file; checks the existing chain (a torn last record, from a
    /// crash mid-write, is cut off) and starts the writer.
    pub fn open(
        path: &Path,
        signer: Arc<dyn CheckpointSigner>,
        opts: Options,
    ) -> Result<Self, AuditError> {
        Self::open_pinned(path, signer, opts, None, Box::new(|_| {}))
    }

    /// [`AuditLog::open`], refusing a log that does not reach `pinned` (the
    /// last checkpoint the previous writer reported; see [`Pin`]), and
    /// reporting each new checkpoint to `pin_sink` once it is fsynced.
    /// Records found after the last checkpoint (a crash before they were
    /// signed) are signed at once by a checkpoint preceded by a
    /// [`RECOVERED`] lifecycle record saying how many they are.
    pub fn open_pinned(
        path: &Path,
        signer: Arc<dyn CheckpointSigner>,
        opts: Options,
        pinned: Option<Pin>,
        pin_sink: PinSink,
    ) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(path))?;
        let bytes = std::fs::read(path).map_err(io(path))?;
        let (recs, torn) = records(&bytes).map_err(|source| AuditError::Broken {
            path: path.to_path_buf(),
            source,
        })?;
        let len = bytes.len() as u64 - torn;
        // The whole chain, not only the decoding, must hold before we
        // extend it (a torn tail is cut below).
        crate::verify::verify(&bytes[..len as usize], Some(signer.public_key())).map_err(
            |source| AuditError::Broken {
                path: path.to_path_buf(),
                source,
            },
        )?;
        if let Some(pin) = pinned {
            check_pin(path, &recs, pin)?;
        }
        if torn > 0 {
            tracing::warn!(path = %path.display(), bytes = torn, "audit log: cut a torn last record");
            file.set_len(len).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
        let (seq, head, unsigned) = chain_tail(&recs);
        let index = crate::page::Index::default();
        index.extend(
            recs.iter()
                .filter(|(_, r, _)| r.seq.is_multiple_of(crate::page::STRIDE))
                .map(|(off, _, _)| *off),
        );
        drop(bytes);
        let lost = Arc::new(AtomicU64::new(0));
        let (tx, rx) = sync_channel(opts.capacity.max(1));
        let mut w = Writer {
            index: index.clone(),
            pending_index: Vec::new(),
            pin_sink,
            pending_pin: None,
            file,
            path: path.to_path_buf(),
            len,
            seq,
            head,
            unsigned,
            oldest_unsigned: (unsigned > 0).then(Instant::now),
            signer,
            opts,
            lost: lost.clone(),
        };
        if unsigned > 0 {
            tracing::warn!(path = %path.display(), records = unsigned,
                "audit log: records from before a crash were not signed; marking them recovered");
            let mut buf = Vec::new();
            w.push(
                &mut buf,
                Entry::default(),
                What::Lifecycle {
                    state: RECOVERED.into(),
                    reason: format!(
                        "{unsigned} records after the last checkpoint, found at open \
                         (written before a crash, signed only now)"
                    ),
                },
            );
            w.checkpoint(&mut buf);
            w.write(&buf);
            if w.lost.load(Ordering::Relaxed) > 0 {
                return Err(AuditError::Lost(w.lost.load(Ordering::Relaxed)));
            }
        }
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx))
            .map_err(io(path))?;
        Ok(Self {
            index,
            tx: Some(tx),
            path: path.to_path_buf(),
            lost,
            writer: Some(writer),
        })
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn index(&self) -> &crate::page::Index {
        &self.index
    }

    /// Queues a record. It is never dropped: when `capacity` records are
    /// already queued (the disk is behind), the caller waits for room —
    /// back-pressure on the request that made the record. On a worker of a
    /// multi-threaded tokio runtime the wait is inside
    /// [`tokio::task::block_in_place`], so the worker's other tasks move to
    /// another thread and the runtime is never stalled by a slow disk;
    /// elsewhere (plain threads, a current-thread runtime) it is a plain
    /// blocking wait. The record is durable after the writer's next fsync
    /// (see [`AuditLog::flush`]).
    pub fn append(&self, entry: Entry, what: What) {
        use std::sync::mpsc::TrySendError;
        let Some(tx) = &self.tx else {
            return;
        };
        let msg = match tx.try_send(Msg::Entry(entry, what)) {
            Ok(()) => return,
            Err(TrySendError::Disconnected(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(TrySendError::Full(msg)) => msg,
        };
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let send = || tx.send(msg).is_ok();
        let sent = if on_worker {
            tokio::task::block_in_place(send)
        } else {
            send()
        };
        if !sent {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every record appended before this call is written and
    /// fsynced (or lost to a write error, which this reports).
    pub fn flush(&self) -> Result<(), AuditError> {
        self.flush_with(false)
    }

    /// [`AuditLog::flush`], with a signed checkpoint after the last record
    /// (used when the broker stops: the whole log is then signed).
    pub fn checkpoint(&self) -> Result<(), AuditError> {
        self.flush_with(true)
    }

    fn flush_with(&self, sign: bool) -> Result<(), AuditError> {
        let tx = self.tx.as_ref().ok_or(AuditError::Stopped)?;
        let (done, wait) = sync_channel(1);
        tx.send(Msg::Flush(done, sign))
            .map_err(|_| AuditError::Stopped)?;
        wait.recv().map_err(|_| AuditError::Stopped)?;
        match self.lost.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(AuditError::Lost(n)),
        }
    }

    /// Records lost to write errors since the log was opened.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Every whole record in the file, after a flush.
    pub fn read_all(&self) -> Result<Vec<Record>, AuditError> {
        // A write error is reported by `lost`; the file is still readable.
        let _ = self.flush();
        let bytes = std::fs::read(&self.path).map_err(io(&self.path))?;
        let (recs, _) = records(&bytes).map_err(|source| AuditError::Broken {
            path: self.path.clone(),
            source,
        })?;
        Ok(recs.into_iter().map(|(_, r, _)| r).collect())
    }
}

impl Drop for AuditLog {
    /// Stops the writer after it has written (and checkpointed) every
    /// queued record.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>) {
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

    fn push(&mut self, buf: &mut Vec<u8>, entry: Entry, what: What) {
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

    fn checkpoint(&mut self, buf: &mut Vec<u8>) {
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
    fn write(&mut self, buf: &[u8]) {
        if buf.is_empty() {
            return;
        }
        let r = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        match r {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.index.extend(self.pending_index.drain(..));
                if let Some(pin) = self.pending_pin.take() {
                    (self.pin_sink)(pin);
                }
            }
            Err(e) => {
                self.pending_pin = None;
                self.pending_index.clear();
                tracing::error!(path = %self.path.display(), error = %e, "audit log write failed");
                let _ = self.file.set_len(self.len);
                self.rewind();
                let n = crate::verify::records(buf)
                    .map(|(r, _)| r.len() as u64)
                    .unwrap_or(0);
                self.lost.fetch_add(n, Ordering::Relaxed);
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
