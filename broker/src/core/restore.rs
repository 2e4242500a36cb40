//! Restore: verify a frozen copy completely, resume it in a new VMM, and
//! consume the copy. One restore per bubble at a time (its permit): a
//! second restore of the same generation finds the bubble READY.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::commands::Restore;
use super::lifecycle::{self, State, Step};
use super::table::{Live, Permit};
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::store::frozen::{ClaimError, ClaimKeeper};
use crate::store::registry::{BubbleRecord, FrozenRef, IdleRule};
use crate::vmm::{ImageSpec, Vmm};

/// Where a restore's time went.
pub(super) struct Timings {
    /// Until the last chunk was verified.
    pub(super) fetch: Duration,
    /// Until the VMM was ready for the pages.
    pub(super) spawn: Duration,
    /// Until the VM ran the snapshot.
    pub(super) vm: Duration,
    /// What the VMM spent rebuilding the VM.
    pub(super) vmm_restore: Duration,
}

/// How long a restore waits behind other operations on its bubble.
const RESTORE_WAIT: Duration = Duration::from_secs(60);

impl Broker {
    /// Restores one of `parent`'s suspended bubbles, or imports one that
    /// another broker sharing the store suspended (`cmd.generation > 0`).
    pub async fn restore(
        self: &Arc<Self>,
        parent: &str,
        cmd: Restore,
    ) -> Result<BubbleRecord, BrokerError> {
        let started = std::time::Instant::now();
        let r = self.restore_untimed(parent, cmd).await;
        if r.is_ok() {
            self.metrics
                .restore_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        r
    }

    async fn restore_untimed(
        self: &Arc<Self>,
        parent: &str,
        cmd: Restore,
    ) -> Result<BubbleRecord, BrokerError> {
        let (permit, imported) = match self
            .permit_owned(parent, &cmd.bubble_id, RESTORE_WAIT)
            .await
        {
            Ok(p) => (p, false),
            Err(BrokerError::NotAccessible(_))
                if cmd.generation > 0 && self.table.get(&cmd.bubble_id).is_none() =>
            {
                (self.import_frozen(parent, &cmd).await?, true)
            }
            Err(e) => return Err(e),
        };
        let generation = permit.rec.generation;
        let r = self.restore_held(permit, cmd.kek.as_ref()).await;
        match r {
            // An import that lost the copy (another broker claimed or
            // consumed it) leaves no record behind here.
            Err(
                e @ (BrokerError::ClaimedElsewhere(_)
                | BrokerError::ClaimLost(_)
                | BrokerError::FrozenMissing
                | BrokerError::WrongKey
                | BrokerError::DataLoss(_)),
            ) if imported => {
                self.forget_import(&cmd.bubble_id, generation);
                Err(match e {
                    BrokerError::ClaimedElsewhere(_) | BrokerError::ClaimLost(_) => e,
                    _ => BrokerError::NotAccessible(cmd.bubble_id.clone()),
                })
            }
            r => r,
        }
    }

    /// Removes a record an import made, if it is still the SUSPENDED copy
    /// of `generation` it was made as.
    fn forget_import(&self, id: &str, generation: u64) {
        let _serial = self.apply_serial.lock();
        let Some(rec) = self.table.get(id) else {
            return;
        };
        if rec.state != State::Suspended || rec.generation != generation {
            return;
        }
        match self.registry.remove_many(std::slice::from_ref(&rec)) {
            Ok(()) => self.table.remove(&[id.to_string()]),
            Err(e) => warn!(bubble = %id, error = %e, "could not forget a failed import"),
        }
    }

    async fn restore_held(
        self: &Arc<Self>,
        permit: Permit,
        parent_key: Option<&bubble_keys::Kek>,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = permit.rec.clone();
        let id = rec.id.clone();
        let frozen = match (rec.state, rec.frozen.clone()) {
            (State::Suspended, Some(f)) => f,
            (state, _) => {
                return Err(BrokerError::WrongState {
                    id,
                    state: lifecycle::name(state),
                    detail: ": only a SUSPENDED bubble can be restored".into(),
                })
            }
        };
        if frozen.parent_key && parent_key.is_none() {
            return Err(BrokerError::WrongKey);
        }
        let kek = parent_key.unwrap_or(&self.kek);
        let t0 = Instant::now();
        let image = ImageSpec::parse(&rec.image, true).map_err(BrokerError::Spawn)?;
        // Fetch and verify the frozen copy while a VMM process starts and
        // creates the empty VM; it receives nothing unless all verifies.
        // Only the registry's current generation may run: an older copy
        // (rollback) or an already restored one is refused.
        let (header, cipher) = self.frozen.open(&id, frozen.generation, kek).await?;
        let t_open = t0.elapsed();
        if header.owner != rec.owner || header.generation != rec.generation {
            return Err(BrokerError::DataLoss(
                "frozen copy does not match the registry (owner or generation)".into(),
            ));
        }
        // Exactly one broker sharing the store restores this generation:
        // it holds the claim, renewed while the restore runs, and commits
        // it before the registry says READY.
        let claim = match self
            .frozen
            .claim(&id, frozen.generation, &self.broker_id)
            .await
        {
            Ok(c) => c,
            Err(ClaimError::Taken | ClaimError::Lost) => {
                return Err(BrokerError::ClaimedElsewhere(id))
            }
            Err(ClaimError::Store(e)) => return Err(e),
        };
        let t_claim = t0.elapsed();
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("restore.claimed").await;
        let keeper = ClaimKeeper::start(self.frozen.clone(), claim);
        // Whether a spare VMM was ready for this restore (else it pays a
        // fresh, jailed start).
        let spares_ready = self.spawner.spares().0;
        let loaded = self.thaw(&rec, &frozen, &header, cipher, &image, t0).await;
        let claim = keeper.finish().await;
        let ((vmm, timings), mut claim) = match (loaded, claim) {
            (Ok(x), Some(c)) => (x, c),
            (Err(e), claim) => {
                // Nothing runs: the copy stays restorable, by anyone.
                if let Some(c) = claim {
                    self.frozen.release(c).await;
                }
                return Err(e);
            }
            (Ok((vmm, _)), None) => {
                vmm.shutdown().await;
                return Err(BrokerError::ClaimLost(id));
            }
        };
        #[cfg(feature = "fault-injection")]
        crate::fault::pause_pid("restore.loaded", vmm.pid()).await;
        let t_loaded = t0.elapsed();
        // The fence: a claimant whose lease ran out and was taken over
        // (paused, then back) finds its claim changed and commits nothing.
        match self.frozen.commit(&mut claim).await {
            Ok(()) => {}
            Err(e) => {
                warn!(bubble = %id, error = %e, token = claim.token(), "restore not committed");
                vmm.shutdown().await;
                return Err(match e {
                    ClaimError::Store(e) => {
                        self.frozen.release(claim).await;
                        e
                    }
                    _ => BrokerError::ClaimLost(id),
                });
            }
        }
        let t_commit = t0.elapsed();
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("restore.committed").await;
        let (r, live) = match self.resume(&id, vmm).await {
            Ok(x) => x,
            Err(e) => {
                // Not recorded (its VMM stopped): give the committed claim
                // back.
                self.frozen.release(claim).await;
                return Err(e);
            }
        };
        let t_ready = t0.elapsed();
        drop(permit);
        if let Err(e) = self
            .frozen
            .delete(&id, frozen.generation, header.chunks)
            .await
        {
            warn!(bubble = %id, error = %e, "could not delete the consumed frozen copy");
        }
        let Timings {
            fetch: t_fetch,
            spawn: t_spawn,
            vm: t_vm,
            vmm_restore,
        } = timings;
        let us = |d: Duration| d.as_micros() as u64;
        // Where the time went, each since the restore began: manifest
        // opened, claim taken, copy loaded into the VMM (spawn, chunks,
        // vCPU state), claim committed, registry READY.
        info!(
            bubble = %id,
            parent = %r.owner,
            generation = frozen.generation,
            instance = live.instance,
            open_us = us(t_open),
            claim_us = us(t_claim),
            loaded_us = us(t_loaded),
            commit_us = us(t_commit),
            ready_us = us(t_ready),
            spares_ready,
            fetch_us = t_fetch.as_micros() as u64,
            vmm_ready_us = t_spawn.as_micros() as u64,
            vm_us = (t_vm - t_spawn).as_micros() as u64,
            vmm_restore_us = vmm_restore.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "bubble restored"
        );
        Ok(r)
    }

    /// Records a loaded bubble READY and makes its VMM the live one. The
    /// registry says READY (and forgets the copy) before the copy is
    /// consumed: the same generation never runs twice.
    /// If the registry refuses, the VMM is stopped.
    async fn resume(
        self: &Arc<Self>,
        id: &str,
        vmm: Vmm,
    ) -> Result<(BubbleRecord, Arc<Live>), BrokerError> {
        let pid = vmm.pid();
        let jail_warning = vmm.jail_warning();
        let r = match self.apply(id, Step::Thawed, "", |r| {
            r.frozen = None;
            r.vmm_pid = pid;
            r.jail_warning = jail_warning;
            r.last_active_ms = now_ms();
        }) {
            Ok(r) => r,
            Err(e) => {
                vmm.shutdown().await;
                return Err(e);
            }
        };
        let live = self.table.live(vmm);
        self.table.set_live(id, Some(live.clone()));
        self.watch_vmm(id.to_string(), &live);
        Ok((r, live))
    }

    /// Takes over a bubble suspended by another broker sharing the store:
    /// the frozen copy must open with the given key and name the caller as
    /// its owner. Unknown ids, other owners, other keys and damaged copies
    /// all get the same not-accessible error.
    async fn import_frozen(
        self: &Arc<Self>,
        parent: &str,
        cmd: &Restore,
    ) -> Result<Permit, BrokerError> {
        let kek = cmd.kek.as_ref().unwrap_or(&self.kek);
        let not_accessible = || BrokerError::NotAccessible(cmd.bubble_id.clone());
        let header = match self.frozen.open(&cmd.bubble_id, cmd.generation, kek).await {
            Ok((h, _)) => h,
            Err(BrokerError::FrozenMissing | BrokerError::WrongKey | BrokerError::DataLoss(_)) => {
                return Err(not_accessible())
            }
            Err(e) => return Err(e),
        };
        if header.owner != parent || header.bubble_id != cmd.bubble_id {
            return Err(not_accessible());
        }
        let image = ImageSpec::parse(&header.image, true).map_err(BrokerError::Spawn)?;
        let mut rec = self.new_record(
            parent,
            &format!("import:{}:{}", cmd.bubble_id, cmd.generation),
            header.memory_mib,
            &image,
            "",
            IdleRule::default(),
        );
        rec.id = cmd.bubble_id.clone();
        rec.state = State::Suspended;
        rec.generation = header.generation;
        rec.parent_keyed = cmd.kek.is_some();
        rec.frozen = Some(FrozenRef {
            generation: header.generation,
            parent_key: cmd.kek.is_some(),
        });
        let inserted = self.table.with(|t| {
            self.admit(t, parent, rec.memory_mib)?;
            Ok::<_, BrokerError>(t.insert_held(rec.clone()))
        })?;
        let Some(permit) = inserted else {
            // A concurrent import of the same bubble got there first: take
            // its permit after it and find the bubble as it left it.
            return self
                .permit_owned(parent, &cmd.bubble_id, RESTORE_WAIT)
                .await;
        };
        if let Err(e) = self.registry.put(&rec) {
            self.table.remove(std::slice::from_ref(&rec.id));
            return Err(e.into());
        }
        info!(bubble = %rec.id, parent = %parent, generation = rec.generation, "frozen bubble imported from the shared store");
        Ok(permit)
    }
}
