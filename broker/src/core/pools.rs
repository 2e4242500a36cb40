//! Warm pools: booted bubbles without an owner, kept at each profile's
//! size and handed to parents by attach.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::commands::Attach;
use super::lifecycle::State;
use super::pool_policy::{check_policy, profile_policy, route, PoolRoute};
use super::{now_ms, Broker};
use crate::config::{self, PoolProfile};
use crate::error::{invalid, BrokerError};
use crate::store::registry::{BubbleRecord, IdleRule, PortionPolicy};
use crate::vmm::{CallFailure, FailureKind, FailureReason, ImageSpec};

/// Pooled bubbles an attach with a policy may fail (each one that could
/// not take the policy is failed, never pooled again) before it gives up
/// with [`BrokerError::PolicyNotApplied`]: a broken VMM or guest build
/// must not drain a whole pool for one request.
pub(crate) const MAX_POLICY_ATTEMPTS: u32 = 2;

/// How long after an attach its bubble's VMM is moved to its new owner's
/// cgroup (see [`Broker::charge_to_owner`]).
const CHARGE_DELAY: Duration = Duration::from_millis(5);

impl Broker {
    fn profile(&self, name: &str) -> Option<&PoolProfile> {
        self.cfg.pools.iter().find(|p| p.name == name)
    }

    /// The policy `profile`'s pooled bubbles carry (checked at start).
    pub(super) fn pool_policy(&self, profile: &PoolProfile) -> Result<PortionPolicy, BrokerError> {
        profile_policy(profile, self.cfg.max_payload)
    }

    /// Ready and booting pooled bubbles of a profile.
    fn pool_counts(&self, profile: &str) -> (usize, usize) {
        self.table.with(|t| {
            t.records()
                .filter(|r| r.owner.is_empty() && r.profile == profile)
                .fold((0, 0), |(ready, booting), r| match r.state {
                    State::Ready => (ready + 1, booting),
                    State::Booting => (ready, booting + 1),
                    _ => (ready, booting),
                })
        })
    }

    /// Keeps one profile's pool at its size.
    pub(super) async fn refill_loop(broker: std::sync::Weak<Self>, p: PoolProfile) {
        let image = match ImageSpec::parse(&p.image, true) {
            Ok(i) => i,
            Err(e) => {
                warn!(profile = %p.name, error = %e, "pool disabled: bad image");
                return;
            }
        };
        // Installed at boot (as a create's is), before the bubble is READY
        // and so before any attach can see it.
        let policy = match broker.upgrade().map(|b| b.pool_policy(&p)) {
            Some(Ok(policy)) => policy,
            Some(Err(e)) => {
                warn!(profile = %p.name, error = %e, "pool disabled: bad policy");
                return;
            }
            None => return,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(b) = broker.upgrade() else { return };
            if b.closing() {
                return;
            }
            let (ready, booting) = b.pool_counts(&p.name);
            if ready + booting < p.size as usize {
                let mut rec = b.new_record("", "", p.memory_mib, &image, &p.name, p.idle_rule());
                rec.policy = policy.clone();
                let failed = match b.start(rec, image.clone(), Instant::now()).await {
                    Ok(r) if r.state == State::Ready => {
                        b.note_pool_vcpu(&r.id).await;
                        None
                    }
                    Ok(r) => Some(format!("pool bubble failed: {}", r.failure_reason)),
                    Err(e) => Some(format!("pool refill refused: {e}")),
                };
                drop(b);
                match failed {
                    None => backoff = Duration::from_millis(100),
                    Some(why) => {
                        warn!(profile = %p.name, reason = %why, "pool refill");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                continue;
            }
            let notify = b.pool_changed.clone();
            drop(b);
            let notified = notify.notified();
            tokio::select! {
                _ = notified => {},
                _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            }
        }
    }

    /// Hands `parent` a READY bubble from a warm pool (or boots one for it
    /// when none is ready within the wait).
    pub async fn attach(
        self: &Arc<Self>,
        parent: &str,
        cmd: Attach,
    ) -> Result<BubbleRecord, BrokerError> {
        self.refuse_if_draining()?;
        let started = Instant::now();
        let profile = self
            .profile(&cmd.profile)
            .cloned()
            .ok_or_else(|| invalid("profile", format!("no warm pool named {:?}", cmd.profile)))?;
        // A policy the guest would refuse fails here, before any pooled
        // bubble is touched.
        check_policy(&cmd.policy)?;
        let pooled_policy = self.pool_policy(&profile)?;
        let route = route(&pooled_policy, &cmd.policy);
        let idle = cmd.idle.unwrap_or_else(|| profile.idle_rule());
        let request_id = cmd.client_request_id.as_str();
        let image = ImageSpec::parse(&profile.image, true).map_err(|e| invalid("profile", e))?;
        // The record a miss boots (made when needed: it carries the time).
        let record = || {
            self.new_record(
                parent,
                request_id,
                profile.memory_mib,
                &image,
                &profile.name,
                idle,
            )
        };
        if !request_id.is_empty() {
            let existing = match self.request_in_memory(parent, request_id) {
                Some(id) => Some(id),
                None => self.registry.request(parent, request_id)?,
            };
            if let Some(existing) = existing {
                let mut want = record();
                want.policy = cmd.policy.clone();
                return self.settled_same(&existing, &want).await;
            }
        }
        let deadline = Instant::now() + cmd.wait;
        loop {
            let notified = self.pool_changed.notified();
            let taken = match route {
                // No pooled bubble may be handed over: boot one at once.
                PoolRoute::Boot => break,
                PoolRoute::Take => {
                    self.take_pooled(parent, &profile, idle, request_id, &cmd.policy, None)?
                }
                PoolRoute::Install => {
                    self.take_pooled_with_policy(
                        parent,
                        &profile,
                        idle,
                        request_id,
                        &pooled_policy,
                        &cmd.policy,
                    )
                    .await?
                }
            };
            if let Some((r, fresh)) = taken {
                if fresh {
                    self.charge_to_owner(&r);
                }
                let r = self.unbill_pool_vcpu(r).await;
                // Refill in the background, after this answer has gone out:
                // booting the replacement competes for the same cores.
                let notify = self.pool_changed.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    notify.notify_waiters();
                });
                self.metrics
                    .attach_seconds
                    .observe(started.elapsed().as_secs_f64());
                info!(
                    bubble = %r.id,
                    parent = %parent,
                    profile = %profile.name,
                    us = started.elapsed().as_micros() as u64,
                    "attached from pool"
                );
                return Ok(r);
            }
            if Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
        // Miss: boot one for this parent (with the policy, as create does).
        self.metrics.pool_misses.inc();
        let mut rec = record();
        rec.policy = cmd.policy.clone();
        let r = self.start(rec, image, Instant::now()).await;
        self.metrics
            .attach_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// Notes a pooled bubble's vCPU time so far (its boot, the health
    /// probes) as time not to bill, ahead of any attach, so that an attach
    /// needs no round trip to the VMM for it ([`Self::unbill_pool_vcpu`]
    /// uses it). Noted again after every health probe; whatever the idle
    /// guest uses after the last note (nothing, or part of a probe racing
    /// the attach: microseconds) is billed to the owner, never the
    /// reverse. Nothing is noted for a bubble no longer pooled.
    pub(super) async fn note_pool_vcpu(&self, id: &str) {
        let Some(live) = self.table.live_of(id) else {
            return;
        };
        let Some(v) = live.vmm.vcpu_us().await else {
            return;
        };
        let noted = self.table.with(|t| {
            t.record_mut(id).is_some_and(|r| {
                let pooled = r.owner.is_empty() && r.state == State::Ready;
                if pooled && v > r.usage.vcpu_us_unbilled {
                    r.usage.vcpu_us_unbilled = v;
                }
                pooled
            })
        });
        if noted {
            self.dirty.lock().insert(id.to_string());
        }
    }

    /// Records the vCPU time an attached bubble's VMM used in the pool, so
    /// that it is not billed to its new owner, if no note was taken before
    /// the attach ([`Self::note_pool_vcpu`]). (A call the owner makes
    /// between the assignment and this status answer is not billed either:
    /// microseconds at most.)
    async fn unbill_pool_vcpu(&self, rec: BubbleRecord) -> BubbleRecord {
        if rec.usage.billed_from_ms == 0 || rec.usage.vcpu_us_unbilled > 0 {
            return rec;
        }
        let Some(live) = self.table.live_of(&rec.id) else {
            return rec;
        };
        let Some(v) = live.vmm.vcpu_us().await else {
            return rec;
        };
        let updated = self.table.with(|t| {
            t.record_mut(&rec.id).map(|r| {
                if r.usage.vcpu_us_unbilled == 0 && r.usage.vcpu_us_before == 0 {
                    r.usage.vcpu_us_unbilled = v;
                }
                r.clone()
            })
        });
        self.dirty.lock().insert(rec.id.clone());
        updated.unwrap_or(rec)
    }

    /// The oldest READY pooled bubble of `profile` carrying `carries`.
    fn pick_pooled(&self, profile: &PoolProfile, carries: &[u8]) -> Option<String> {
        self.table.with(|t| {
            t.records()
                .filter(|r| {
                    r.owner.is_empty()
                        && r.profile == profile.name
                        && r.state == State::Ready
                        && r.policy.encode() == carries
                })
                .min_by_key(|r| (r.created_at_ms, r.id.clone()))
                .map(|r| r.id.clone())
        })
    }

    /// Assigns the oldest READY pooled bubble of `profile` carrying
    /// exactly the policy `policy` to `parent`; with `only`, that bubble
    /// (if it is still pooled and READY), which carries the default policy
    /// and has just had `policy` installed. With the record, whether this
    /// call assigned it (not a concurrent retry of the same request).
    fn take_pooled(
        &self,
        parent: &str,
        profile: &PoolProfile,
        idle: IdleRule,
        client_request_id: &str,
        policy: &PortionPolicy,
        only: Option<&str>,
    ) -> Result<Option<(BubbleRecord, bool)>, BrokerError> {
        let wanted = policy.encode();
        let carries = match only {
            Some(_) => PortionPolicy::default().encode(),
            None => wanted.clone(),
        };
        let taken = self.table.with(|t| {
            // A concurrent retry of the same attach already got one.
            if !client_request_id.is_empty() {
                if let Some(r) = t
                    .records()
                    .find(|r| r.owner == parent && r.client_request_id == client_request_id)
                {
                    if r.policy.encode() != wanted {
                        return Err(BrokerError::RequestIdReused { field: "policy" });
                    }
                    return Ok(Some((r.clone(), false)));
                }
            }
            let pooled = |r: &BubbleRecord| {
                r.owner.is_empty()
                    && r.profile == profile.name
                    && r.state == State::Ready
                    && r.policy.encode() == carries
            };
            let id = match only {
                Some(id) => t.record(id).filter(|r| pooled(r)).map(|r| r.id.clone()),
                None => t
                    .records()
                    .filter(|r| pooled(r))
                    .min_by_key(|r| (r.created_at_ms, r.id.clone()))
                    .map(|r| r.id.clone()),
            };
            let Some(id) = id else {
                return Ok(None);
            };
            // The pooled bubble already counts for the host; check the parent.
            self.admit_parent_only(t, parent, profile.memory_mib)?;
            let Some(r) = t.record_mut(&id) else {
                return Ok(None);
            };
            r.owner = parent.to_string();
            r.client_request_id = if client_request_id.is_empty() {
                uuid::Uuid::new_v4().simple().to_string()
            } else {
                client_request_id.to_string()
            };
            r.idle = idle;
            let now = now_ms();
            r.last_active_ms = now;
            // Billing starts now: the pool period (memory time, probe
            // calls) is not the new owner's.
            r.usage.attached(now);
            r.calls = 0;
            if only.is_some() {
                r.policy = policy.clone();
            }
            Ok::<_, BrokerError>(Some((r.clone(), true)))
        })?;
        let Some((rec, fresh)) = taken else {
            return Ok(None);
        };
        if fresh {
            self.emit(super::Event {
                owner: parent.to_string(),
                bubble_id: rec.id.clone(),
                state: rec.state,
                reason: format!("attached from pool {}", profile.name),
                at_ms: rec.last_active_ms,
                security: None,
            });
            // The new owner reaches the disk in the background (group
            // commit), off the attach path; until it has, every operation
            // on the bubble waits for it (see `owned_synced`). A crash
            // before that leaves the bubble recorded as pooled, and a
            // restarted broker discards pooled bubbles: it is never handed
            // to another parent.
            self.unsynced_owners.lock().insert(rec.id.clone());
            self.owners_kick.notify_one();
        }
        Ok(Some((rec, fresh)))
    }

    /// [`Broker::take_pooled`] for an attach with a security policy: the
    /// policy is installed in the pooled bubble under its permit, before
    /// the owner is set, so nothing the new owner does (list, load,
    /// attest) can come before it, and its attestation binds it. A bubble
    /// that received the policy but could not be handed over (the parent's
    /// quota, a lost race) is failed, never returned to the pool.
    async fn take_pooled_with_policy(
        self: &Arc<Self>,
        parent: &str,
        profile: &PoolProfile,
        idle: IdleRule,
        client_request_id: &str,
        pooled: &PortionPolicy,
        policy: &PortionPolicy,
    ) -> Result<Option<(BubbleRecord, bool)>, BrokerError> {
        let mut attempts = 0u32;
        let carries = pooled.encode();
        // The install path only ever starts from the default policy.
        if carries != PortionPolicy::default().encode() {
            return Ok(None);
        }
        loop {
            if !client_request_id.is_empty() {
                if let Some(id) = self.request_in_memory(parent, client_request_id) {
                    return match self.table.get(&id) {
                        Some(r) if r.policy.encode() != policy.encode() => {
                            Err(BrokerError::RequestIdReused { field: "policy" })
                        }
                        other => Ok(other.map(|r| (r, false))),
                    };
                }
            }
            let Some(id) = self.pick_pooled(profile, &carries) else {
                return Ok(None);
            };
            let Some(permit) = self.table.permit(&id).await else {
                continue;
            };
            let (Some(live), true) = (
                permit.live.clone(),
                permit.rec.owner.is_empty()
                    && permit.rec.state == State::Ready
                    && permit.rec.policy.encode() == carries,
            ) else {
                // Taken, probed unhealthy or gone meanwhile: the next one.
                continue;
            };
            // Refuse before the bubble is touched, not after.
            self.table
                .with(|t| self.admit_parent_only(t, parent, profile.memory_mib))?;
            let set = live
                .vmm
                .call(
                    bubble_abi::ops::OP_SET_POLICY,
                    &policy.encode(),
                    config::DEFAULT_CALL_DEADLINE,
                )
                .await;
            #[cfg(feature = "fault-injection")]
            let set = match crate::fault::fails("attach.set_policy") {
                true => Err(CallFailure::Refused("fault injected".into())),
                false => set,
            };
            if let Err(e) = set {
                let reason = FailureReason::new(
                    FailureKind::Internal,
                    format!("could not apply an attaching parent's security policy: {e:?}"),
                );
                warn!(bubble = %id, reason = %reason.detail, "pooled bubble failed");
                self.fail(&id, &reason);
                drop(permit);
                if matches!(e, CallFailure::Rejected(bubble_abi::code::BAD_INPUT, _)) {
                    // The guest refused the policy itself: no other bubble
                    // would take it.
                    return Err(invalid("policy", "the bubble refused the policy"));
                }
                attempts += 1;
                if attempts >= MAX_POLICY_ATTEMPTS {
                    return Err(BrokerError::PolicyNotApplied(attempts));
                }
                continue;
            }
            match self.take_pooled(parent, profile, idle, client_request_id, policy, Some(&id)) {
                Ok(Some((r, fresh))) if r.id == id => return Ok(Some((r, fresh))),
                other => {
                    let reason = FailureReason::new(
                        FailureKind::Internal,
                        "a parent's policy was installed but the bubble was not handed over"
                            .to_string(),
                    );
                    self.fail(&id, &reason);
                    drop(permit);
                    match other {
                        // A retry of the same request got another one.
                        Ok(Some(r)) => return Ok(Some(r)),
                        Ok(None) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// In the background, after the attach has answered: moves an
    /// attached pooled bubble's VMM out of the pool's cgroup into one
    /// under its new owner's, so that its memory counts against the
    /// owner's limit (see `docs/jail.md`), and notes in its jail warning
    /// what could not follow (memory charged while pooled, where the
    /// kernel does not move charges).
    fn charge_to_owner(self: &Arc<Self>, rec: &BubbleRecord) {
        let Some(live) = self.table.live_of(&rec.id) else {
            return;
        };
        let broker = Arc::downgrade(self);
        let (id, owner, memory_mib) = (rec.id.clone(), rec.owner.clone(), rec.memory_mib);
        tokio::spawn(async move {
            // After the attach's answer has gone out (and usually the
            // owner's first call): making the cgroups and moving a whole
            // process competes for the same cores (measured: it doubled
            // the broker's side of an attach when started at once).
            tokio::time::sleep(CHARGE_DELAY).await;
            let spawner = match broker.upgrade() {
                Some(b) => b.spawner.clone(),
                None => return,
            };
            let warning = live
                .vmm
                .move_to_parent(&spawner, &owner, &id, memory_mib)
                .await;
            let Some(b) = broker.upgrade() else { return };
            info!(bubble = %id, parent = %owner, pid = live.vmm.pid(), warning = warning.as_deref().unwrap_or(""), "attached bubble's VMM charged to its parent (the warning says what could not be)");
            let Some(warning) = warning else { return };
            let noted = b.table.with(|t| {
                t.record_mut(&id).is_some_and(|r| {
                    let same = r.owner == owner;
                    if same {
                        r.jail_warning = match r.jail_warning.is_empty() {
                            true => warning.clone(),
                            false => format!("{}; {warning}", r.jail_warning),
                        };
                    }
                    same
                })
            });
            if noted {
                b.dirty.lock().insert(id);
            }
        });
    }

    /// The bubble `parent` made with this request id, if the in-memory
    /// table has it (assignments not yet on disk included).
    fn request_in_memory(&self, parent: &str, client_request_id: &str) -> Option<String> {
        self.table.with(|t| {
            t.records()
                .find(|r| r.owner == parent && r.client_request_id == client_request_id)
                .map(|r| r.id.clone())
        })
    }
}
