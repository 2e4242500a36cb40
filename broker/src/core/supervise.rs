//! Applying lifecycle steps to the table and the registry, and following
//! each VMM's notices.

use std::sync::Arc;

use tracing::{info, warn};

use super::lifecycle::{self, State, Step};
use super::table::Live;
use super::{now_ms, Broker, Event};
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;
use crate::vmm::{FailureReason, VmmNotice};

impl Broker {
    /// Applies `step` to a bubble (see [`lifecycle::apply`]), runs `update`
    /// on its record, persists it (except the transient READY ↔ BUSY
    /// flips) and only then changes the table and broadcasts the change:
    /// a change the registry cannot record (a full disk) is not made. An
    /// illegal step changes nothing and answers FAILED_PRECONDITION with
    /// the bubble's state. Steps are applied one at a time.
    pub(crate) fn apply(
        &self,
        id: &str,
        step: Step,
        reason: &str,
        update: impl FnOnce(&mut BubbleRecord),
    ) -> Result<BubbleRecord, BrokerError> {
        let transient = matches!(step, Step::CallBegan | Step::CallEnded);
        // Calls change only memory; every other step is computed,
        // persisted and stored under this lock, so that two steps (a
        // failure notice and an operation) cannot interleave.
        let _serial = (!transient).then(|| self.apply_serial.lock());
        self.apply_held(id, step, reason, update)
    }

    /// [`Broker::apply`] with the step lock already held (or not needed).
    fn apply_held(
        &self,
        id: &str,
        step: Step,
        reason: &str,
        update: impl FnOnce(&mut BubbleRecord),
    ) -> Result<BubbleRecord, BrokerError> {
        let now = now_ms();
        let transient = matches!(step, Step::CallBegan | Step::CallEnded);
        let (rec, prev) = self.table.with(|t| {
            let cur = t
                .record(id)
                .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
            let prev = cur.state;
            let to = lifecycle::apply(prev, step).map_err(|e| BrokerError::WrongState {
                id: id.to_string(),
                state: lifecycle::name(e.from),
                detail: if cur.failure_reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", cur.failure_reason)
                },
            })?;
            let mut r = cur.clone();
            if to == State::Ready && r.usage.running_since_ms == 0 {
                r.usage.running_since_ms = now;
            }
            if matches!(to, State::Failed | State::Deleted | State::Suspended) {
                r.usage.stop_running(r.memory_mib, now);
            }
            if matches!(to, State::Failed | State::Deleted) && r.ended_at_ms == 0 {
                r.ended_at_ms = now;
            }
            r.state = to;
            if to == State::Failed {
                r.failure_reason = reason.to_string();
            }
            update(&mut r);
            if transient {
                if let Some(cur) = t.record_mut(id) {
                    *cur = r.clone();
                }
            }
            Ok::<_, BrokerError>((r, prev))
        })?;
        match step {
            // Every call flips READY -> BUSY -> READY: kept in memory and
            // flushed with the counters.
            Step::CallBegan | Step::CallEnded => {
                self.dirty.lock().insert(id.to_string());
            }
            // Re-derived by reconciliation after a crash (a BOOTING
            // record with a live VMM is re-adopted, one without is
            // failed): not written on the create path at all, only marked
            // for the next flush, as a call's counters are. (It was a
            // non-durable commit before, lost in a crash just the same.)
            Step::Booted => {
                self.dirty.lock().insert(id.to_string());
            }
            _ => self.registry.put(&rec)?,
        }
        if !transient {
            self.table.with(|t| {
                if let Some(cur) = t.record_mut(id) {
                    // A pool assignment may have given the bubble its
                    // owner meanwhile (the only change made outside a
                    // step); keep it.
                    let (owner, request, idle) = (
                        std::mem::take(&mut cur.owner),
                        std::mem::take(&mut cur.client_request_id),
                        cur.idle,
                    );
                    *cur = rec.clone();
                    if !owner.is_empty() {
                        (cur.owner, cur.client_request_id, cur.idle) = (owner, request, idle);
                    }
                }
            });
        }
        if prev != rec.state {
            let ev = Event {
                owner: rec.owner.clone(),
                bubble_id: id.to_string(),
                state: rec.state,
                reason: reason.to_string(),
                at_ms: now,
                security: None,
            };
            if !transient {
                self.audit_state(&ev);
            }
            self.emit(ev);
        }
        Ok(rec)
    }

    /// Marks a bubble FAILED and stops its VMM process if one runs. A
    /// bubble that is not running (already failed, suspended, deleted) is
    /// left as it is, and the failure is counted once.
    pub(crate) fn fail(self: &Arc<Self>, id: &str, reason: &FailureReason) {
        self.fail_with(id, None, reason, String::new());
    }

    /// Fails a bubble on behalf of VMM `instance` (its notice), or of the
    /// holder of its permit (`None`). A notice counts only if that
    /// instance is still the bubble's VMM when the step is applied: the
    /// check and the step happen under the step lock, so a suspend and
    /// restore finishing meanwhile cannot let an old VMM's notice fail the
    /// new one. An applied failure that is a security matter raises its
    /// event (naming portion `digest`, if known).
    pub(super) fn fail_with(
        self: &Arc<Self>,
        id: &str,
        instance: Option<u64>,
        reason: &FailureReason,
        digest: String,
    ) {
        let (kind, detail) = (reason.kind, reason.detail.as_str());
        let applied = {
            let _serial = self.apply_serial.lock();
            if let Some(i) = instance {
                if !self.table.is_current(id, i) {
                    info!(bubble = %id, instance = i, reason = detail, "notice of a replaced VMM ignored");
                    return;
                }
            }
            let r = self.apply_held(id, Step::Failed, detail, |r| {
                r.vmm_pid = 0;
                r.failure_kind = kind.label().to_string();
            });
            // The VMM goes with the step, under the same lock.
            let live = r.as_ref().ok().and_then(|_| self.table.set_live(id, None));
            (r, live)
        };
        match applied {
            (Ok(rec), live) => {
                warn!(bubble = %id, %kind, reason = detail, "bubble failed");
                self.metrics.failed(kind);
                self.failure_event(&rec, kind, digest);
                if let Some(live) = live {
                    tokio::spawn(async move { live.vmm.shutdown().await });
                }
            }
            (Err(e), _) => {
                info!(bubble = %id, %kind, reason = detail, state = %e, "failure not applied")
            }
        }
        self.pool_changed.notify_waiters();
    }

    /// Follows one VMM instance's notices: a guest failure or a vanished
    /// process fails the bubble while that instance is still the bubble's
    /// current VMM; notices of an instance that was replaced (suspended and
    /// restored) or removed (deleted) are ignored.
    pub(crate) fn watch_vmm(self: &Arc<Self>, id: String, live: &Arc<Live>) {
        let broker = Arc::downgrade(self);
        let mut notices = live.vmm.notices();
        let (instance, pid) = (live.instance, live.vmm.pid());
        tokio::spawn(async move {
            while let Some(n) = notices.recv().await {
                let Some(b) = broker.upgrade() else { return };
                match n {
                    VmmNotice::Log(line) => {
                        info!(bubble = %id, instance, pid, guest_log = %line, "guest log");
                        b.guest_log(&id, &line);
                    }
                    VmmNotice::Failed(reason) | VmmNotice::Gone(reason) => {
                        b.fail_with(&id, Some(instance), &reason, String::new());
                        return;
                    }
                }
            }
        });
    }
}
