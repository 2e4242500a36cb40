//! A restore's snapshot sent over the VMM's socket as it arrives (where
//! guest memory cannot be written directly): `RESTORE [len]`, then each
//! piece the caller pushes in `RESTORE_DATA` frames of at most
//! `SNAPSHOT_PIECE` bytes. The client keeps none of it: a push returns
//! once its frames are in the socket (the kernel's socket buffer, which
//! the VMM drains into guest memory, is the only backlog), so the caller
//! bounds the snapshot bytes in flight by what it holds before pushing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, MutexGuard};

use bubble_vmm::control::{Request, SNAPSHOT_PIECE};

use crate::client::{unexpected, Answer, VmmClient, Waiter};
use crate::vmm_error::VmmError;

/// How long a push whose write failed waits for the VMM's reason.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

/// A snapshot upload in progress. It holds the VMM's socket until it ends
/// (nothing else talks to a restoring VMM).
pub struct RestoreUpload<'a> {
    client: &'a VmmClient,
    w: MutexGuard<'a, bubble_uds::WriteHalf>,
    id: u64,
    answer: oneshot::Receiver<Answer>,
    left: u64,
}

impl VmmClient {
    /// Starts sending a snapshot of `len` bytes to a VMM started in restore
    /// mode: [`RestoreUpload::push`] its bytes in order, then
    /// [`RestoreUpload::finish`].
    pub async fn restore_upload(&self, len: u64) -> Result<RestoreUpload<'_>, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Request::Restore { len }
            .frame(id)
            .map_err(VmmError::Encode)?;
        let (tx, answer) = oneshot::channel();
        self.pending.lock().insert(id, Waiter::One(tx));
        let w = self.writer.lock().await;
        let mut up = RestoreUpload {
            client: self,
            w,
            id,
            answer,
            left: len,
        };
        if up.w.write_all(&frame).await.is_err() {
            return Err(up.refused().await);
        }
        Ok(up)
    }
}

impl RestoreUpload<'_> {
    /// Sends the next `piece` of the snapshot (any length, cut into frames
    /// of at most `SNAPSHOT_PIECE` bytes). More bytes than announced are
    /// refused before any is sent.
    pub async fn push(&mut self, piece: &[u8]) -> Result<(), VmmError> {
        let n = piece.len() as u64;
        if n > self.left {
            return Err(VmmError::Snapshot(
                "more snapshot bytes than announced".into(),
            ));
        }
        for p in piece.chunks(SNAPSHOT_PIECE) {
            if crate::stream::write_piece(&mut self.w, self.id, p)
                .await
                .is_err()
            {
                return Err(self.refused().await);
            }
        }
        self.left -= n;
        Ok(())
    }

    /// Bytes still to push.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Waits for the VMM's answer once every byte was pushed; returns the
    /// time the VMM spent rebuilding the VM.
    pub async fn finish(self, timeout: Duration) -> Result<Duration, VmmError> {
        if self.left != 0 {
            self.client.pending.lock().remove(&self.id);
            return Err(VmmError::Snapshot("the snapshot ends early".into()));
        }
        let RestoreUpload {
            client,
            w,
            id,
            answer,
            ..
        } = self;
        drop(w);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(a)) => restore_answer(a.map_err(|e| VmmError::Protocol(e.to_string()))?),
            Ok(Err(_)) => Err(VmmError::Closed),
            Err(_) => {
                client.pending.lock().remove(&id);
                Err(VmmError::Timeout(timeout))
            }
        }
    }

    /// A write failed: the VMM may have refused the snapshot part-way and
    /// said why; prefer that.
    async fn refused(&mut self) -> VmmError {
        let answer = tokio::time::timeout(REFUSAL_GRACE, &mut self.answer).await;
        self.client.pending.lock().remove(&self.id);
        match answer {
            Ok(Ok(Ok(r))) => match restore_answer(r) {
                Ok(_) => VmmError::Protocol("VMM answered before the snapshot ended".into()),
                Err(e) => e,
            },
            _ => VmmError::Closed,
        }
    }
}

/// The answer to RESTORE: the VMM's rebuild time.
fn restore_answer(r: bubble_vmm::control::Reply) -> Result<Duration, VmmError> {
    match r {
        bubble_vmm::control::Reply::RestoreOk { took_us } => Ok(Duration::from_micros(took_us)),
        other => Err(unexpected(other)),
    }
}
