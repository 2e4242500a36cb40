//! Loading a claimed frozen copy into a new VMM, with the broker holding
//! a bounded number of chunks: they are fetched and verified (AES-GCM,
//! the snapshot id and index as AAD) a few ahead while the VMM starts,
//! then each is written into guest memory as soon as it is verified and
//! dropped. The VM runs nothing until every chunk has verified, the total
//! length is the sealed header's and the vCPU state has been sent; if
//! anything fails on the way the VMM is stopped (with whatever pages it
//! got) and the copy is kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_keys::envelope::ChunkCipher;
use bubble_vmm_client::{GuestSpan, WriteError};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::restore::Timings;
use super::Broker;
use crate::error::BrokerError;
use crate::store::frozen::{Header, PlainChunk};
use crate::store::registry::{BubbleRecord, FrozenRef};
use crate::vmm::{ImageSpec, Vmm};

/// Verified chunks queued for the writer, beyond those being fetched
/// (`FETCH_AHEAD` in the store): the broker holds at most about
/// `QUEUED + FETCH_AHEAD + 1` chunks of a restore at a time.
pub const QUEUED: usize = 2;

/// Why a streamed load stopped.
enum Stop {
    /// Failed: the VMM must go.
    Failed(BrokerError),
    /// Guest memory cannot be written directly (no span, the config says
    /// so, or the kernel refused at the first chunk, which is handed
    /// back): the snapshot is sent over the socket instead.
    Refused(Option<PlainChunk>),
}

type Chunks = mpsc::Receiver<Result<PlainChunk, BrokerError>>;

impl Broker {
    /// Fetches and verifies the claimed copy and loads it into a new VMM
    /// (not yet READY: the restore commits its claim first).
    pub(super) async fn thaw(
        self: &Arc<Self>,
        rec: &BubbleRecord,
        frozen: &FrozenRef,
        header: &Header,
        cipher: ChunkCipher,
        image: &ImageSpec,
        t0: Instant,
    ) -> Result<(Vmm, Timings), BrokerError> {
        let id = rec.id.clone();
        let dir = self.cfg.bubble_dir(&id);
        let (tx, mut rx) = mpsc::channel(QUEUED);
        let chunks = self
            .frozen
            .fetch_stream(&id, frozen.generation, header, cipher);
        tokio::spawn(async move {
            futures::pin_mut!(chunks);
            while let Some(c) = chunks.next().await {
                let failed = c.is_err();
                if tx.send(c).await.is_err() || failed {
                    break;
                }
            }
        });
        let vmm = Vmm::spawn_restore(&self.spawner, &self.cfg, &dir, rec, image)
            .await
            .map_err(BrokerError::Spawn)?;
        // The sealed header's page runs: the VMM faults those pages in
        // (zeroes only) while the first chunks are verified, and says where
        // its guest memory is.
        let span = match vmm.prefault(&header.page_runs).await {
            Ok(s) => s,
            Err(e) => {
                warn!(bubble = %id, error = %e, "prefault refused; streaming the snapshot");
                None
            }
        };
        let t_spawn = t0.elapsed();
        let mem = u64::from(rec.memory_mib) << 20;
        let streamed = match span {
            Some(span) if !self.cfg.restore_over_socket => {
                write_streamed(&vmm, span, mem, header, &mut rx).await
            }
            _ => Err(Stop::Refused(None)),
        };
        let loaded = match streamed {
            Ok(x) => Ok(x),
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::Refused(first)) => {
                if first.is_some() {
                    info!(bubble = %id, "writing guest memory refused; streaming the snapshot");
                }
                send_streamed(&vmm, header, first, &mut rx, t0).await
            }
        };
        let (vmm_restore, t_fetch) = match loaded {
            Ok(x) => x,
            Err(e) => {
                vmm.shutdown().await;
                return Err(e);
            }
        };
        let timings = Timings {
            fetch: t_fetch,
            spawn: t_spawn,
            vm: t0.elapsed(),
            vmm_restore,
        };
        Ok((vmm, timings))
    }
}

fn length_differs() -> BrokerError {
    BrokerError::DataLoss("snapshot length differs from the manifest".into())
}

/// Writes each verified chunk into the VMM's guest memory as it comes,
/// then sends the vCPU state. Returns the VMM's rebuild time and when the
/// last chunk had verified.
async fn write_streamed(
    vmm: &Vmm,
    span: GuestSpan,
    mem: u64,
    header: &Header,
    rx: &mut Chunks,
) -> Result<(Duration, Duration), Stop> {
    let t0 = Instant::now();
    let mut w = vmm.page_writer(span, mem);
    let (mut total, mut first) = (0u64, true);
    while let Some(c) = rx.recv().await {
        let c = c.map_err(Stop::Failed)?;
        total = total.saturating_add(c.len() as u64);
        if total > header.total_len {
            return Err(Stop::Failed(length_differs()));
        }
        match blocking(|| w.feed(c.expose())) {
            Ok(()) => {}
            Err(WriteError::Refused(_)) if first => return Err(Stop::Refused(Some(c))),
            Err(e @ (WriteError::Refused(_) | WriteError::Gone)) => {
                return Err(Stop::Failed(BrokerError::Spawn(format!("restore: {e}"))))
            }
            Err(e @ WriteError::Snapshot(_)) => {
                return Err(Stop::Failed(BrokerError::DataLoss(e.to_string())))
            }
        }
        first = false;
    }
    if total != header.total_len {
        return Err(Stop::Failed(length_differs()));
    }
    let fetched = t0.elapsed();
    let state = w
        .finish()
        .map_err(|e| Stop::Failed(BrokerError::DataLoss(e.to_string())))?;
    let took = vmm.restore_state(&state).await.map_err(Stop::Failed)?;
    Ok((took, fetched))
}

/// Sends the snapshot (`first`, then the rest) over the VMM's socket,
/// each chunk as soon as it has verified: where guest memory cannot be
/// written directly. It holds no more of the snapshot than the direct
/// path (the chunks queued and being fetched, plus the one being sent in
/// `RESTORE_DATA` frames of at most 1 MiB); the VMM runs nothing until it
/// has every byte the sealed header announced.
async fn send_streamed(
    vmm: &Vmm,
    header: &Header,
    first: Option<PlainChunk>,
    rx: &mut Chunks,
    t0: Instant,
) -> Result<(Duration, Duration), BrokerError> {
    let first = match first {
        Some(c) => c,
        None => rx.recv().await.ok_or_else(length_differs)??,
    };
    // The snapshot's head is checked before the VMM gets a byte.
    bubble_vmm::snapshot::parse_head(first.expose(), header.total_len as usize)
        .map_err(|e| BrokerError::DataLoss(format!("snapshot does not decode: {e}")))?;
    let mut up = vmm.restore_upload(header.total_len).await?;
    let mut next = Some(first);
    let mut total = 0u64;
    while let Some(c) = next.take() {
        total = total.saturating_add(c.len() as u64);
        if total > header.total_len {
            return Err(length_differs());
        }
        up.push(c.expose()).await.map_err(restore_error)?;
        drop(c);
        next = match rx.recv().await {
            Some(c) => Some(c?),
            None => None,
        };
    }
    if total != header.total_len {
        return Err(length_differs());
    }
    let t_fetch = t0.elapsed();
    let took = up
        .finish(Duration::from_secs(60))
        .await
        .map_err(restore_error)?;
    Ok((took, t_fetch))
}

/// A restore the VMM did not take, typed for the broker.
fn restore_error(e: bubble_vmm_client::VmmError) -> BrokerError {
    match e {
        // Authenticated, yet it does not lay out: damaged, not transient.
        bubble_vmm_client::VmmError::Snapshot(e) => {
            BrokerError::DataLoss(format!("snapshot does not decode: {e}"))
        }
        e => BrokerError::Spawn(format!("restore: {e}")),
    }
}

/// Runs `f` (a system call writing up to a chunk into another process)
/// without stalling other tasks on a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
