//! Snapshots as streams: a suspend's `SNAPSHOT` pieces arrive one by one
//! ([`SnapshotStream`], bounded memory), and a restore's snapshot goes to
//! the VMM, written straight into guest memory or in `RESTORE_DATA`
//! frames.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

use bubble_vmm::control::{head, GuestSpan, Kind, Reply, Request, SNAPSHOT_PIECE};

use crate::direct::{write_pages, Target};
use crate::procmem::WriteError;

use crate::client::{unexpected, Answer, Pending, VmmClient, Waiter};
use crate::vmm_error::VmmError;

/// Pieces the client holds for a slow receiver before it stops reading
/// the VMM (which then stops sending).
const PIECES_AHEAD: usize = 4;

/// Wipes a snapshot piece nobody takes (plaintext guest memory).
pub(crate) fn wipe(a: Answer) {
    if let Ok(Reply::Snapshot(mut b)) = a {
        b.zeroize();
    }
}

/// Writes one `RESTORE_DATA` frame of request `id`.
pub(crate) async fn write_piece(
    w: &mut bubble_uds::WriteHalf,
    id: u64,
    piece: &[u8],
) -> std::io::Result<()> {
    let h = head(Kind::RestoreData as u8, id, piece.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&h).await?;
    w.write_all(piece).await
}

/// A snapshot arriving from a VMM, piece by piece (each `SNAPSHOT_PIECE`
/// bytes but the last, wiped when dropped). Dropping the stream early
/// discards the rest; the VMM keeps running.
///
/// A hostile VMM cannot hold a suspend (and whoever awaits it) forever by
/// trickling: each piece is due within the idle limit, the whole snapshot
/// within the total limit, and a short piece must be the last.
pub struct SnapshotStream {
    rx: mpsc::Receiver<Answer>,
    id: u64,
    pending: Pending,
    idle: Duration,
    total: Duration,
    deadline: tokio::time::Instant,
    short_seen: bool,
    /// Set from the request until the snapshot ends: the reader takes
    /// snapshot frames only then. A stream dropped early leaves it set,
    /// so the rest of that snapshot is discarded, not taken for a
    /// hostile VMM.
    suspending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pieces: u64,
    len: u64,
    done: bool,
}

impl SnapshotStream {
    /// The next piece, or `None` once the VMM said the snapshot is
    /// complete and the pieces and bytes it counted are the ones that came.
    /// Each piece must come within the stream's idle limit.
    pub async fn next(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>, VmmError> {
        if self.done {
            return Ok(None);
        }
        let now = tokio::time::Instant::now();
        let (wait, limit) = if self.deadline.saturating_duration_since(now) < self.idle {
            (self.deadline.saturating_duration_since(now), self.total)
        } else {
            (self.idle, self.idle)
        };
        let answer = self.recv(wait, limit).await;
        if self.done {
            self.suspending.store(false, Ordering::SeqCst);
        }
        answer
    }

    async fn recv(
        &mut self,
        wait: Duration,
        limit: Duration,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, VmmError> {
        let answer = match tokio::time::timeout(wait, self.rx.recv()).await {
            Err(_) => return Err(VmmError::Timeout(limit)),
            Ok(None) => return Err(VmmError::Closed),
            Ok(Some(a)) => a.map_err(|e| VmmError::Protocol(e.to_string()))?,
        };
        match answer {
            Reply::Snapshot(b) => {
                let b = Zeroizing::new(b);
                if self.short_seen {
                    self.done = true;
                    return Err(VmmError::Protocol(
                        "a short snapshot piece was not the last".into(),
                    ));
                }
                self.short_seen = b.len() < SNAPSHOT_PIECE;
                self.pieces += 1;
                self.len += b.len() as u64;
                Ok(Some(b))
            }
            Reply::SnapshotEnd { pieces, len } => {
                self.done = true;
                if (pieces, len) != (self.pieces, self.len) {
                    return Err(VmmError::Protocol(format!(
                        "the VMM sent {} pieces ({} bytes) but counted {pieces} ({len} bytes)",
                        self.pieces, self.len
                    )));
                }
                Ok(None)
            }
            other => {
                self.done = true;
                Err(unexpected(other))
            }
        }
    }
}

impl Drop for SnapshotStream {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
        while let Ok(a) = self.rx.try_recv() {
            wipe(a);
        }
    }
}

impl VmmClient {
    /// Captures the VM at a safe point (between calls): vCPU state and
    /// every non-zero page, as a stream of pieces, each due within `idle`
    /// and all within `total`. The VMM keeps running until
    /// [`VmmClient::shutdown`].
    pub async fn suspend_stream(
        &self,
        idle: Duration,
        total: Duration,
    ) -> Result<SnapshotStream, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Request::Suspend.frame(id).map_err(VmmError::Encode)?;
        let (tx, rx) = mpsc::channel(PIECES_AHEAD);
        self.suspending.store(true, Ordering::SeqCst);
        self.pending.lock().insert(id, Waiter::Stream(tx));
        let stream = SnapshotStream {
            rx,
            id,
            pending: self.pending.clone(),
            idle,
            total,
            deadline: tokio::time::Instant::now() + total,
            short_seen: false,
            suspending: self.suspending.clone(),
            pieces: 0,
            len: 0,
            done: false,
        };
        let mut w = self.writer.lock().await;
        w.write_all(&frame).await.map_err(|_| VmmError::Closed)?;
        Ok(stream)
    }

    /// [`VmmClient::suspend_stream`], collected into one buffer (small
    /// bubbles and tests: it holds the whole snapshot), all within `limit`.
    pub async fn suspend(&self, limit: Duration) -> Result<Zeroizing<Vec<u8>>, VmmError> {
        let mut s = self.suspend_stream(limit, limit).await?;
        let mut all = Zeroizing::new(Vec::new());
        while let Some(p) = s.next().await? {
            all.extend_from_slice(&p);
        }
        Ok(all)
    }

    /// Asks a VMM in restore mode to fault in these page runs (guest
    /// address, pages) ahead of its snapshot; only zeroes are written.
    /// Returns where guest memory lies in the VMM (host address, length),
    /// for [`VmmClient::restore`] to write pages into directly.
    pub async fn prefault(
        &self,
        runs: &[(u64, u64)],
        timeout: Duration,
    ) -> Result<Option<GuestSpan>, VmmError> {
        let req = Request::Prefault {
            runs: runs.to_vec(),
        };
        match self.request(&req, timeout).await? {
            Reply::PrefaultOk(span) => Ok(span),
            other => Err(unexpected(other)),
        }
    }

    /// A writer of a snapshot into this VMM's guest memory (at `span`, from
    /// [`VmmClient::prefault`]) as its pieces arrive; then
    /// [`VmmClient::restore_state`] with what it returns.
    pub fn page_writer(&self, span: GuestSpan, mem_size: u64) -> crate::PageWriter {
        crate::PageWriter::new(self.proc.clone(), span, mem_size)
    }

    /// Sends the vCPU state of a snapshot whose pages a
    /// [`crate::PageWriter`] wrote; the guest is READY when this returns.
    pub async fn restore_state(
        &self,
        state: &[u8],
        timeout: Duration,
    ) -> Result<Duration, VmmError> {
        restore_answer(
            self.request(&Request::RestoreState { state }, timeout)
                .await?,
        )
    }

    /// Sends the snapshot (the concatenation of `snapshot`'s parts) to a
    /// VMM started in restore mode; the guest is READY when this returns.
    /// Returns the time the VMM spent rebuilding the VM.
    ///
    /// With `direct` (from [`VmmClient::prefault`]) the pages are written
    /// straight into the VMM's guest memory through its memory file (bound
    /// to the process, see [`crate::ProcHandle`]; no socket) and only the vCPU state is sent; where the kernel
    /// refuses that (e.g. ptrace restrictions), the snapshot is streamed
    /// in `RESTORE_DATA` frames of at most `SNAPSHOT_PIECE` bytes.
    pub async fn restore(
        &self,
        snapshot: &[&[u8]],
        direct: Option<GuestSpan>,
        timeout: Duration,
    ) -> Result<Duration, VmmError> {
        if let Some(span) = direct {
            let written = match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| {
                    write_pages(&mut Target::new(self.proc.clone()), span, snapshot)
                }),
                _ => write_pages(&mut Target::new(self.proc.clone()), span, snapshot),
            };
            match written {
                Ok(state) => {
                    let state = zeroize::Zeroizing::new(state);
                    let req = Request::RestoreState { state: &state };
                    return restore_answer(self.request(&req, timeout).await?);
                }
                Err(WriteError::Snapshot(e)) => return Err(VmmError::Snapshot(e)),
                Err(WriteError::Gone) => return Err(VmmError::Closed),
                // Not allowed here: stream it instead.
                Err(WriteError::Refused(e)) => {
                    tracing::info!(error = %e, "writing guest pages directly refused; streaming the snapshot");
                }
            }
        }
        let len = snapshot.iter().map(|p| p.len() as u64).sum();
        let sent = self
            .send(&Request::Restore { len }, snapshot, timeout)
            .await;
        restore_answer(sent.map_err(|e| match e {
            VmmError::Encode(e) => VmmError::Snapshot(e.to_string()),
            e => e,
        })?)
    }
}

/// The answer to RESTORE or RESTORE_STATE: the VMM's rebuild time.
fn restore_answer(r: Reply) -> Result<Duration, VmmError> {
    match r {
        Reply::RestoreOk { took_us } => Ok(Duration::from_micros(took_us)),
        other => Err(unexpected(other)),
    }
}
