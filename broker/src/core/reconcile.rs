//! After a (re)start: make the table agree with the VMM processes that
//! still run. Bubbles that should run are re-adopted or failed; every other
//! VMM under the runtime directory (a bubble suspended, failed or deleted
//! just before the stop, a create never recorded, a restore cut short) is
//! stopped.

use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::lifecycle::{State, Step};
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;
use crate::vmm::{FailureKind, FailureReason, Vmm};

impl Broker {
    /// Re-adopts every bubble that should have a VMM if its VMM still
    /// answers on its socket, fails it otherwise, and stops VMMs that no
    /// running bubble owns.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), BrokerError> {
        let expected: Vec<BubbleRecord> = self.table.with(|t| {
            t.records()
                .filter(|r| r.state.expects_vmm())
                .cloned()
                .collect()
        });
        for rec in expected {
            let dir = self.cfg.bubble_dir(&rec.id);
            if rec.owner.is_empty() {
                // A pooled bubble may have been attached just before the
                // stop, its new owner not yet on disk: never pool it again.
                stop_vmm_in(&self.spawner, &dir, &rec.id).await;
                info!(bubble = %rec.id, profile = %rec.profile, "pooled bubble discarded after restart");
                if let Err(e) = self.apply(&rec.id, Step::Deleted, "", |r| r.vmm_pid = 0) {
                    warn!(bubble = %rec.id, error = %e, "could not record a discarded pool bubble");
                }
                continue;
            }
            let adopted = match Vmm::adopt(&self.spawner, &dir, &rec.id).await {
                Ok((vmm, true)) => match policy_installed(&vmm, &rec).await {
                    Ok(()) => Ok((vmm, true)),
                    Err(why) => {
                        vmm.shutdown().await;
                        Err(why)
                    }
                },
                other => other,
            };
            match adopted {
                Ok((vmm, true)) => {
                    let pid = vmm.pid();
                    // READY first: a VMM that fails at once is then failed
                    // by its notice, not left behind by a refused step.
                    match self.apply(&rec.id, Step::Adopted, "", |r| r.vmm_pid = pid) {
                        Ok(_) => {
                            let live = self.table.live(vmm);
                            info!(bubble = %rec.id, parent = %rec.owner, pid, instance = live.instance, "re-adopted running bubble");
                            self.table.set_live(&rec.id, Some(live.clone()));
                            self.watch_vmm(rec.id.clone(), &live);
                        }
                        Err(e) => {
                            warn!(bubble = %rec.id, error = %e, "could not re-adopt; stopping its VMM");
                            vmm.shutdown().await;
                        }
                    }
                }
                Ok((vmm, false)) => {
                    vmm.shutdown().await;
                    self.fail(
                        &rec.id,
                        &FailureReason::new(
                            FailureKind::BrokerRestart,
                            "bubble was still booting when the broker restarted",
                        ),
                    );
                }
                Err(e) => {
                    warn!(bubble = %rec.id, parent = %rec.owner, error = %e, "bubble lost");
                    self.fail(
                        &rec.id,
                        &FailureReason::new(
                            FailureKind::BrokerRestart,
                            format!("VMM process not running after broker restart ({e})"),
                        ),
                    );
                }
            }
        }
        self.stop_strays().await;
        self.kill_unreachable_vmms().await;
        self.date_ended_records();
        self.release_own_claims();
        Ok(())
    }

    /// Gives back the claims this broker still holds on copies its
    /// registry records as SUSPENDED: a suspend claim (it died between
    /// recording a suspend and giving the claim back) or a committed
    /// restore claim (it died between committing and recording READY; the
    /// VMM it loaded was stopped above, with the other strays), so that
    /// any broker can restore them.
    /// In the background: a slow store does not hold up the start.
    fn release_own_claims(self: &Arc<Self>) {
        let suspended: Vec<(String, u64)> = self.table.with(|t| {
            t.records()
                .filter(|r| r.state == State::Suspended)
                .filter_map(|r| Some((r.id.clone(), r.frozen.as_ref()?.generation)))
                .collect()
        });
        if suspended.is_empty() {
            return;
        }
        let (frozen, me) = (self.frozen.clone(), self.broker_id.clone());
        tokio::spawn(async move {
            for (id, generation) in suspended {
                if let Err(e) = frozen.release_suspended(&id, generation, &me).await {
                    warn!(bubble = %id, generation, error = %e, "could not give back a suspend claim");
                }
            }
        });
    }

    /// Stops every VMM under `bubbles/` whose bubble is not running here
    /// (unknown, or SUSPENDED, FAILED, DELETED), and removes its directory.
    async fn stop_strays(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("bubbles")) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let state = self.table.get(&id).map(|r| r.state);
            if state.is_some_and(State::expects_vmm) && self.table.live_of(&id).is_some() {
                continue;
            }
            stop_vmm_in(&self.spawner, &e.path(), &id).await;
            let _ = std::fs::remove_dir_all(e.path());
            match state {
                None => warn!(bubble = %id, "stopped a VMM that was started but never recorded"),
                Some(s) => {
                    info!(bubble = %id, state = ?s, "stopped a VMM its bubble no longer uses")
                }
            }
        }
    }

    /// Kills, by their cgroups, the VMMs of a previous broker on this data
    /// directory that no running bubble here re-adopted and that could not
    /// be stopped through their socket (above): a VMM started but never
    /// recorded whose socket is gone, a bubble lost because its VMM no
    /// longer answers. Runs before pools refill and before the API serves,
    /// so no VMM of this broker is in a bubble cgroup yet but the
    /// re-adopted ones.
    async fn kill_unreachable_vmms(&self) {
        let keep: Vec<u32> = self
            .table
            .with(|t| {
                t.records()
                    .filter(|r| r.state.expects_vmm())
                    .map(|r| r.id.clone())
                    .collect::<Vec<_>>()
            })
            .iter()
            .filter_map(|id| self.table.live_of(id))
            .map(|live| live.vmm.pid())
            .collect();
        let strays = self.spawner.kill_stray_vmms(keep).await;
        if !strays.killed.is_empty() || !strays.removed.is_empty() {
            info!(
                killed = ?strays.killed,
                cgroups_removed = strays.removed.len(),
                "VMMs no bubble here owns were killed by their cgroups"
            );
        }
        if !strays.surviving.is_empty() || !strays.left.is_empty() {
            warn!(surviving = ?strays.surviving, cgroups = ?strays.left, "VMMs or their cgroups outlived the kill at start");
        }
    }

    /// Records that ended before end times were kept get one now, so that
    /// they are collected a retention period from this start.
    fn date_ended_records(&self) {
        let now = now_ms();
        let undated: Vec<BubbleRecord> = self.table.with(|t| {
            let ids: Vec<String> = t
                .records()
                .filter(|r| matches!(r.state, State::Failed | State::Deleted) && r.ended_at_ms == 0)
                .map(|r| r.id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| {
                    let r = t.record_mut(id)?;
                    r.ended_at_ms = now;
                    Some(r.clone())
                })
                .collect()
        });
        if !undated.is_empty() {
            if let Err(e) = self.registry.put_many(&undated) {
                warn!(error = %e, "dating ended records failed");
            }
        }
    }
}

/// Stops the VMM serving `dir`, if one answers there.
/// Makes sure a re-adopted bubble runs the security policy its record
/// names. Its READY is not written on the create path, so a bubble
/// recorded BOOTING may have been stopped between its guest's READY and
/// the policy's installation: installing it now is the create's last
/// step. A guest that refuses because a policy is already set (or a
/// portion is loaded, the code frozen, a call awaiting: all after the
/// create installed it and answered) runs the recorded one: only the
/// create sets a policy, before anyone can reach the bubble.
async fn policy_installed(vmm: &Vmm, rec: &BubbleRecord) -> Result<(), String> {
    use bubble_abi::code;
    if rec.state != State::Booting || rec.policy == crate::store::registry::PortionPolicy::default()
    {
        return Ok(());
    }
    let set = vmm
        .call(
            bubble_abi::ops::OP_SET_POLICY,
            &rec.policy.encode(),
            crate::config::DEFAULT_CALL_DEADLINE,
        )
        .await;
    match set {
        Ok(_) => Ok(()),
        Err(crate::vmm::CallFailure::Rejected(c, _))
            if [code::STATE, code::FROZEN, code::AWAITING].contains(&c) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("could not apply the security policy: {e:?}")),
    }
}

async fn stop_vmm_in(spawner: &bubble_vmm_client::Spawner, dir: &Path, id: &str) {
    if let Ok((vmm, _)) = Vmm::adopt(spawner, dir, id).await {
        vmm.shutdown().await;
    }
}
