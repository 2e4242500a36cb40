//! Suspend: capture a bubble, store it encrypted, then stop its VMM.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::commands::Suspend;
use super::lifecycle::{self, State, Step};
use super::table::{Live, Permit};
use super::Broker;
use crate::error::BrokerError;
use crate::store::frozen::{ClaimError, ClaimKeeper, Header};
use crate::store::registry::{BubbleRecord, FrozenRef};
use crate::vmm::{FailureKind, FailureReason};

/// How long a suspend waits behind other operations on its bubble.
pub(super) const SUSPEND_WAIT: Duration = Duration::from_secs(60);

impl Broker {
    /// Freezes one of `parent`'s bubbles to the encrypted store.
    pub async fn suspend(
        self: &Arc<Self>,
        parent: &str,
        cmd: Suspend,
    ) -> Result<BubbleRecord, BrokerError> {
        let started = std::time::Instant::now();
        let permit = self
            .permit_owned(parent, &cmd.bubble_id, SUSPEND_WAIT)
            .await?;
        let r = self.suspend_held(permit, cmd.kek).await;
        if r.is_ok() {
            self.metrics
                .suspend_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        r
    }

    /// Freezes the bubble whose permit is held. The order makes a crash at
    /// any point leave either a running bubble or a complete frozen copy
    /// that the registry points at: the copy is stored, the registry says
    /// SUSPENDED, and only then does the VMM stop.
    pub(super) async fn suspend_held(
        self: &Arc<Self>,
        permit: Permit,
        parent_key: Option<bubble_keys::Kek>,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = &permit.rec;
        let id = rec.id.clone();
        let live = match (rec.state, permit.live.clone()) {
            (State::Ready, Some(l)) => l,
            (state, _) => {
                return Err(BrokerError::WrongState {
                    id,
                    state: lifecycle::name(state),
                    detail: String::new(),
                })
            }
        };
        let generation = rec.generation + 1;
        let header = Header {
            bubble_id: id.clone(),
            owner: rec.owner.clone(),
            generation,
            memory_mib: rec.memory_mib,
            image: rec.image.clone(),
            total_len: 0,
            chunks: 0,
            page_runs: Vec::new(),
            kek: String::new(),
        };
        // The generation is this broker's until committed: nobody can
        // import a copy stored but not (yet) recorded, and leftovers of an
        // earlier attempt that crashed are removed first.
        let claim = match self.frozen.reserve(&id, generation, &self.broker_id).await {
            Ok(c) => c,
            Err(ClaimError::Taken | ClaimError::Lost) => {
                return Err(BrokerError::ClaimedElsewhere(id))
            }
            Err(ClaimError::Store(e)) => return Err(e),
        };
        let keeper = ClaimKeeper::start(self.frozen.clone(), claim);
        let kek = parent_key.as_ref().unwrap_or(&self.kek);
        // No call runs while the VM is captured (the permit is held; the
        // vCPU is at its safe point). The snapshot streams from the VMM
        // into the store a chunk at a time. If anything fails (a full disk,
        // the store down, a malformed snapshot), the bubble keeps running.
        let chunks = match self
            .store_snapshot(&live, header, kek, parent_key.is_some())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                if let Some(c) = keeper.finish().await {
                    let _ = self.frozen.purge_generation(&id, generation).await;
                    self.frozen.release(c).await;
                }
                return Err(e);
            }
        };
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("suspend.stored").await;
        // The fence: the claim must still be this broker's (renewed now).
        // A suspend claim never expires for other brokers (however long
        // this one was paused), so only a claim object changed under it
        // (removed, rewritten by a broker that should not have) fails
        // here; then someone else may run the stored copy: this bubble
        // must not run on here beside it, nor be recorded SUSPENDED.
        let claim = match keeper.finish().await {
            Some(mut c) => match self.frozen.renew(&mut c).await {
                Ok(()) => Ok(c),
                Err(e) => Err(e),
            },
            None => Err(ClaimError::Lost),
        };
        let claim = match claim {
            Ok(c) => c,
            Err(ClaimError::Store(e)) => {
                // Unknown whether the claim is still this broker's: the
                // copy goes (the bubble runs on), or, if even that fails,
                // the bubble stops (the copy stays, recorded nowhere).
                if self.frozen.delete(&id, generation, chunks).await.is_err() {
                    let why = "the store failed while the suspend was being committed";
                    self.fail(&id, &FailureReason::new(FailureKind::Internal, why));
                }
                return Err(e);
            }
            Err(_) => {
                let why =
                    "its frozen copy was taken over by another broker before the suspend committed";
                self.fail(&id, &FailureReason::new(FailureKind::Internal, why));
                return Err(BrokerError::ClaimLost(id));
            }
        };
        let vcpu_us = live.vmm.vcpu_us().await;
        let committed = self.apply(&id, Step::Froze, "", |r| {
            r.generation = generation;
            r.frozen = Some(FrozenRef {
                generation,
                parent_key: parent_key.is_some(),
            });
            r.vmm_pid = 0;
            r.parent_keyed = parent_key.is_some();
            if let Some(v) = vcpu_us {
                r.usage.vmm_ended(v);
            }
        });
        let r = match committed {
            Ok(r) => r,
            Err(e) => {
                // Not recorded: the bubble keeps running and the copy is
                // garbage. Deleted before the claim is let go: a released
                // claim on a copy still in the store would let another
                // broker restore it while this bubble runs (a clone).
                match self.frozen.delete(&id, generation, chunks).await {
                    Ok(()) => self.frozen.release(claim).await,
                    Err(d) => {
                        warn!(bubble = %id, error = %d, "could not remove an unrecorded frozen copy; its claim stays held (a suspend claim never expires for other brokers)")
                    }
                }
                return Err(e);
            }
        };
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("suspend.committed").await;
        if let Some(l) = self.table.set_live(&id, None) {
            l.vmm.shutdown().await;
        }
        // Committed: the copy may be restored anywhere now. (A crash before
        // this leaves the claim this broker's: its own restore takes it,
        // and its restart gives it back, see `reconcile`.)
        self.frozen.release(claim).await;
        info!(bubble = %id, parent = %r.owner, generation, "bubble suspended");
        Ok(r)
    }

    /// Streams the VMM's snapshot into a new frozen copy; returns its
    /// chunk count once its manifest is stored.
    async fn store_snapshot(
        &self,
        live: &Live,
        header: Header,
        kek: &bubble_keys::Kek,
        parent_key: bool,
    ) -> Result<u64, BrokerError> {
        let failed = |e: String| BrokerError::BubbleFailed(format!("snapshot: {e}"));
        let mut pieces = live.vmm.suspend(header.memory_mib).await.map_err(failed)?;
        let mut w = self.frozen.writer(header, kek, parent_key);
        while let Some(piece) = pieces.next().await.map_err(|e| failed(e.to_string()))? {
            w.push(&piece).await?;
        }
        w.finish().await
    }
}
