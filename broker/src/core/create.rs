//! Creating a bubble: admission, the record, the VMM and the guest's boot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, Instrument};

use super::commands::NewBubble;
use super::lifecycle::{State, Step};
use super::table::Permit;
use super::{now_ms, Broker, Event};
use crate::config;
use crate::error::BrokerError;
use crate::store::registry::{BubbleRecord, IdleRule, PortionPolicy, RegistryError};
use crate::vmm::{FailureKind, FailureReason, ImageSpec, Vmm};

type Insert = tokio::task::JoinHandle<Result<Option<BubbleRecord>, RegistryError>>;

impl Broker {
    /// Creates a bubble for `parent` and waits until it is READY or FAILED.
    pub async fn create(
        self: &Arc<Self>,
        parent: &str,
        cmd: NewBubble,
    ) -> Result<BubbleRecord, BrokerError> {
        self.refuse_if_draining()?;
        let started = Instant::now();
        let mut rec = self.new_record(
            parent,
            &cmd.client_request_id,
            cmd.memory_mib,
            &cmd.image,
            "",
            cmd.idle,
        );
        rec.policy = cmd.policy;
        let r = self.start(rec, cmd.image, started).await;
        self.metrics
            .create_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    pub(super) fn new_record(
        &self,
        owner: &str,
        client_request_id: &str,
        memory_mib: u32,
        image: &ImageSpec,
        profile: &str,
        idle: IdleRule,
    ) -> BubbleRecord {
        BubbleRecord {
            id: format!("b-{}", uuid::Uuid::new_v4().simple()),
            owner: owner.to_string(),
            client_request_id: if client_request_id.is_empty() {
                uuid::Uuid::new_v4().simple().to_string()
            } else {
                client_request_id.to_string()
            },
            state: State::Booting,
            failure_reason: String::new(),
            failure_kind: String::new(),
            memory_mib,
            vcpus: 1,
            image: image.name(),
            created_at_ms: now_ms(),
            boot_us: 0,
            vmm_pid: 0,
            calls: 0,
            profile: profile.to_string(),
            idle,
            last_active_ms: now_ms(),
            usage: Default::default(),
            policy: PortionPolicy::default(),
            portions: Vec::new(),
            generation: 0,
            frozen: None,
            ended_at_ms: 0,
            parent_keyed: false,
            jail_warning: String::new(),
        }
    }

    /// Admits, records and boots a new bubble (idempotent per owner and
    /// client request id). The new bubble's gate is held until it is READY
    /// or FAILED, so nothing else acts on a booting bubble.
    pub(super) async fn start(
        self: &Arc<Self>,
        rec: BubbleRecord,
        image: ImageSpec,
        received: Instant,
    ) -> Result<BubbleRecord, BrokerError> {
        if self.closing() {
            return Err(BrokerError::Spawn("the broker is shutting down".into()));
        }
        if !rec.owner.is_empty() {
            if let Some(existing) = self.registry.request(&rec.owner, &rec.client_request_id)? {
                return self.settled_same(&existing, &rec).await;
            }
        }
        let permit = self.table.with(|t| {
            self.admit(t, &rec.owner, rec.memory_mib)?;
            t.insert_held(rec.clone())
                .ok_or_else(|| BrokerError::Spawn("bubble id collision".into()))
        })?;
        let admitted = Instant::now();
        // The record reaches the disk while the VMM starts and the guest
        // boots; the bubble is reported only once both are done. A crash in
        // between leaves a VMM without a record, which the next start
        // stops (see `reconcile`). Started here, not after CONFIGURE: there its
        // commit competed with the VMM's boot for the CPUs (measured:
        // docs/performance.md).
        let insert = self.insert_record(&rec);
        let span =
            info_span!("create", bubble = %rec.id, parent = %rec.owner, profile = %rec.profile);
        let stamps = Stamps { received, admitted };
        self.boot(permit, image, insert, stamps)
            .instrument(span)
            .await
    }

    /// The bubble an idempotency key already made, once settled, if it was
    /// made by the same request as `rec` would be; a reused key with other
    /// parameters is refused (ALREADY_EXISTS naming the field).
    pub(super) async fn settled_same(
        &self,
        id: &str,
        rec: &BubbleRecord,
    ) -> Result<BubbleRecord, BrokerError> {
        let existing = self.await_settled(id).await?;
        let differs = [
            ("profile", existing.profile != rec.profile),
            ("memory_mib", existing.memory_mib != rec.memory_mib),
            ("image", existing.image != rec.image),
            ("idle", existing.idle != rec.idle),
            ("policy", existing.policy != rec.policy),
        ];
        match differs.iter().find(|(_, d)| *d) {
            Some((field, _)) => Err(BrokerError::RequestIdReused { field }),
            None => Ok(existing),
        }
    }

    /// The bubble as soon as nothing holds its gate (a create or restore of
    /// it has finished).
    pub(super) async fn await_settled(&self, id: &str) -> Result<BubbleRecord, BrokerError> {
        let wait = self.cfg.boot_timeout + Duration::from_secs(5);
        match tokio::time::timeout(wait, self.table.permit(id)).await {
            Ok(Some(p)) => Ok(p.rec),
            Ok(None) => Err(BrokerError::NotAccessible(id.to_string())),
            Err(_) => Err(BrokerError::Queued(id.to_string())),
        }
    }

    /// Starts the insert of `rec`'s record on a blocking thread.
    fn insert_record(self: &Arc<Self>, rec: &BubbleRecord) -> Insert {
        let b = self.clone();
        let r = rec.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let inserted = b.registry.insert_new(&r);
            tracing::debug!(
                insert_us = t.elapsed().as_micros() as u64,
                "bubble record inserted"
            );
            inserted
        })
    }

    async fn boot(
        self: &Arc<Self>,
        permit: Permit,
        image: ImageSpec,
        insert: Insert,
        stamps: Stamps,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = permit.rec.clone();
        let id = rec.id.clone();
        let ev = Event {
            owner: rec.owner.clone(),
            bubble_id: id.clone(),
            state: State::Booting,
            reason: String::new(),
            at_ms: now_ms(),
            security: None,
        };
        self.audit_state(&ev);
        self.emit(ev);
        let dir = self.cfg.bubble_dir(&id);
        let t0 = Instant::now();
        let booting = async {
            let vmm = Vmm::spawn(&self.spawner, &self.cfg, &dir, &rec, &image)
                .await
                .map_err(|e| {
                    let detail = format!("VMM did not start: {e}");
                    (true, FailureReason::new(FailureKind::SpawnFailed, detail))
                })?;
            let live = self.table.live(vmm);
            self.table.set_live(&id, Some(live.clone()));
            let spawn_us = t0.elapsed().as_micros() as u64;
            // READY is the guest's READY_EARLY: it runs; it makes its keys
            // next, and its VMM serves no call before they exist (the
            // policy install below waits for them too). A failure after
            // it reaches `watch_vmm` (see `Vmm::notices`).
            let boot_us = live
                .vmm
                .wait_ready(self.cfg.boot_timeout)
                .await
                .map_err(|e| (false, e))?;
            let woke = Instant::now();
            let vmm_ready_us = t0.elapsed().as_micros() as u64;
            Ok::<_, (bool, FailureReason)>((live, boot_us, spawn_us, vmm_ready_us, woke))
        };
        let (inserted, booted) = tokio::join!(insert, booting);
        let joined = Instant::now();
        let joined_us = t0.elapsed().as_micros() as u64;
        let inserted = inserted
            .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))
            .and_then(|r| r.map_err(BrokerError::from));
        let existing = match inserted {
            Ok(None) => None,
            Ok(Some(existing)) => Some(Ok(existing.id)),
            Err(e) => Some(Err(e)),
        };
        if let Some(other) = existing {
            // Not recorded (a concurrent retry won, or the disk failed):
            // this bubble never existed.
            if let Some(live) = self.table.set_live(&id, None) {
                live.vmm.shutdown().await;
            }
            let _ = std::fs::remove_dir_all(&dir);
            self.table.remove(std::slice::from_ref(&id));
            drop(permit);
            // The same checks as a retry's: a concurrent request with
            // this id but other parameters (a policy) is refused, never
            // handed the other's bubble.
            return self.settled_same(&other?, &rec).await;
        }
        let (live, boot_us, spawn_us, vmm_ready_us, woke) = match booted {
            Ok(x) => x,
            Err((spawn_failed, reason)) => {
                self.fail(&id, &reason);
                if spawn_failed {
                    return Err(BrokerError::Spawn(reason.detail));
                }
                return Ok(self.table.get(&id).unwrap_or(rec));
            }
        };
        let pid = live.vmm.pid();
        #[cfg(feature = "fault-injection")]
        crate::fault::pause("create.booted").await;
        if rec.policy != PortionPolicy::default() {
            // Fix the security policy before anyone can load a portion.
            let set = live
                .vmm
                .call(
                    bubble_abi::ops::OP_SET_POLICY,
                    &rec.policy.encode(),
                    config::DEFAULT_CALL_DEADLINE,
                )
                .await;
            if let Err(e) = set {
                let reason = FailureReason::new(
                    FailureKind::Internal,
                    format!("could not apply the security policy: {e:?}"),
                );
                self.fail(&id, &reason);
                return Ok(self.table.get(&id).unwrap_or(rec));
            }
        }
        self.watch_vmm(id.clone(), &live);
        let jail_warning = live.vmm.jail_warning();
        let r = match self.apply(&id, Step::Booted, "", |r| {
            r.boot_us = boot_us;
            r.vmm_pid = pid;
            r.jail_warning = jail_warning;
        }) {
            Ok(r) => r,
            // It failed while it booted: report the failed bubble.
            Err(BrokerError::WrongState { .. }) => return Ok(self.table.get(&id).unwrap_or(rec)),
            Err(e) => return Err(e),
        };
        let applied_us = t0.elapsed().as_micros() as u64;
        info!(
            boot_us,
            spawn_us,
            vmm_ready_us,
            joined_us,
            applied_us,
            ready_us = t0.elapsed().as_micros() as u64,
            pid,
            instance = live.instance,
            "bubble ready"
        );
        let recorded = Instant::now();
        drop(permit);
        if r.owner.is_empty() {
            self.pool_changed.notify_waiters();
        }
        stamps.log(&live.vmm, woke, joined, recorded);
        Ok(r)
    }
}

/// When a create passed its first steps (the rest are on its VMM).
#[derive(Clone, Copy, Debug)]
pub(super) struct Stamps {
    /// The request reached the broker's core.
    pub(super) received: Instant,
    /// It was admitted (quota) and its bubble is in the table.
    pub(super) admitted: Instant,
}

impl Stamps {
    /// Logs, at debug level (cheap when off), the create's steps in µs
    /// since the request was received (docs/performance.md, "The
    /// broker's part of a create").
    fn log(&self, vmm: &Vmm, woke: Instant, joined: Instant, recorded: Instant) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let at = |t: Option<Instant>| {
            t.map_or(0, |t| {
                t.saturating_duration_since(self.received).as_micros() as u64
            })
        };
        let steps = vmm.spawn_steps();
        tracing::debug!(
            admitted_us = at(Some(self.admitted)),
            spare = steps.taken.is_some(),
            taken_us = at(steps.taken),
            dir_us = at(steps.dir),
            cgroup_us = at(steps.cgroup),
            configure_us = at(steps.sent),
            ready_us = at(vmm.ready_received_at()),
            woke_us = at(Some(woke)),
            joined_us = at(Some(joined)),
            recorded_us = at(Some(recorded)),
            answered_us = at(Some(Instant::now())),
            "create steps"
        );
    }
}
