//! The writer: records go through a bounded channel to one thread that
//! chains, writes and fsyncs them in batches, and signs a checkpoint every
//! `checkpoint_every` records or `checkpoint_interval`, whichever is first,
//! and in every write that holds a security-relevant record
//! ([`What::checkpoint_at_once`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::record::{Entry, Record, What};
use crate::staged::{PinStore, Staged};
use crate::verify::{records, VerifyError};
use crate::writer::Writer;

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

/// The `state` of the lifecycle record written at open when records staged
/// outside the log were missing from it and were appended back
/// (`crate::staged`); its reason says how many.
pub const RESTORED: &str = "restored";

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

pub(crate) enum Msg {
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

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The next sequence number, the chain head and the records since the
/// last checkpoint, of a decoded log.
pub(crate) fn chain_tail(recs: &[crate::verify::Located]) -> (u64, [u8; 32], u64) {
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
        let store = Box::new(crate::staged::SinkOnly(pin_sink));
        Self::open_staged(path, signer, opts, pinned, None, store)
    }

    /// [`AuditLog::open_pinned`] with write-ahead staging
    /// (`crate::staged`): every batch holding a checkpoint is handed to
    /// `store` before it is written; at open, records of `staged` that the
    /// log lacks are appended back from it (followed by a [`RESTORED`]
    /// lifecycle record saying how many), a log holding other records where
    /// they belong is refused, and the last checkpoint the log then holds
    /// is pinned at once (`store.stage(Some(it), None)`).
    pub fn open_staged(
        path: &Path,
        signer: Arc<dyn CheckpointSigner>,
        opts: Options,
        pinned: Option<Pin>,
        staged: Option<Staged>,
        store: Box<dyn PinStore>,
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
        let mut bytes = std::fs::read(path).map_err(io(path))?;
        let (mut recs, torn) = records(&bytes).map_err(|source| AuditError::Broken {
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
        bytes.truncate(len as usize);
        let mut restored = 0u64;
        if let Some(s) = &staged {
            let tail = crate::staged::missing_tail(path, &recs, s)?;
            if !tail.is_empty() {
                bytes.extend_from_slice(&tail);
                let broken = |source| AuditError::Broken {
                    path: path.to_path_buf(),
                    source,
                };
                crate::verify::verify(&bytes, Some(signer.public_key())).map_err(broken)?;
                let before = recs.len() as u64;
                recs = records(&bytes).map_err(broken)?.0;
                restored = recs.len() as u64 - before;
                (&file)
                    .write_all(&tail)
                    .and_then(|()| file.sync_data())
                    .map_err(io(path))?;
                tracing::warn!(path = %path.display(), records = restored,
                    "audit log: records staged in the registry were missing from the log; restored");
            }
        }
        let len = bytes.len() as u64;
        let durable = recs
            .iter()
            .rev()
            .find(|(_, r, _)| matches!(r.what, What::Checkpoint { .. }))
            .map(|(_, r, h)| Pin {
                seq: r.seq,
                hash: *h,
            });
        // Verify-and-repin: whatever checkpoint the log holds past the pin
        // (a crash between its fsync and the pin's commit) is pinned now,
        // and the staged batch, now in the log, is dropped.
        if let Some(d) = durable {
            if staged.is_some() || pinned.is_none_or(|p| p.seq < d.seq) {
                store.stage(Some(d), None);
            }
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
            store,
            pending_pin: None,
            durable,
            batch_from: seq,
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
        let mut buf = Vec::new();
        if restored > 0 {
            w.push(
                &mut buf,
                Entry::default(),
                What::Lifecycle {
                    state: RESTORED.into(),
                    reason: format!(
                        "{restored} records staged in the registry were missing from the log \
                         at open (a crash before they were written, or a cut) and were \
                         appended back"
                    ),
                },
            );
        }
        if unsigned > 0 {
            tracing::warn!(path = %path.display(), records = unsigned,
                "audit log: records from before a crash were not signed; marking them recovered");
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
        }
        if !buf.is_empty() {
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
