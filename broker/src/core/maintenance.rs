//! Background upkeep: idle policies (suspend or delete a bubble nobody
//! called for a while), collection of ended records, counter flushes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::lifecycle::State;
use super::{now_ms, Broker};
use crate::store::registry::{BubbleRecord, IdleAction};

/// Whether a record's idle policy is due at `now`. A bubble whose parent
/// keeps its frozen copies under its own key is never idle-suspended: the
/// broker has only its own key, and sealing the bubble under it would let
/// the broker (not only the parent) restore it. It stays running.
fn idle_due(r: &BubbleRecord, now: u64) -> bool {
    !r.owner.is_empty()
        && r.state == State::Ready
        && r.idle.action != IdleAction::Stay
        && !(r.idle.action == IdleAction::Suspend && r.parent_keyed)
        && r.idle.timeout_s > 0
        && now.saturating_sub(r.last_active_ms) >= u64::from(r.idle.timeout_s) * 1000
}

impl Broker {
    /// Applies idle policies, collects ended records and flushes metering
    /// counters, every `idle_check_interval`.
    pub(super) async fn maintenance_loop(broker: std::sync::Weak<Self>) {
        let mut last_flush = Instant::now();
        loop {
            let interval = match broker.upgrade() {
                Some(b) => b.cfg.idle_check_interval,
                None => return,
            };
            tokio::time::sleep(interval).await;
            let Some(b) = broker.upgrade() else { return };
            b.apply_idle_policies().await;
            if last_flush.elapsed() >= Duration::from_secs(5) {
                b.flush_counters();
                b.collect_ended();
                last_flush = Instant::now();
            }
        }
    }

    /// Suspends or deletes bubbles idle past their policy. Each goes
    /// through its permit and is re-checked under it: a call that arrived
    /// meanwhile keeps the bubble as it is.
    async fn apply_idle_policies(self: &Arc<Self>) {
        let now = now_ms();
        let due: Vec<String> = self.table.with(|t| {
            t.records()
                .filter(|r| idle_due(r, now))
                .map(|r| r.id.clone())
                .collect()
        });
        for id in due {
            // Busy bubbles are not idle: don't wait behind their calls.
            let Ok(Some(permit)) =
                tokio::time::timeout(Duration::from_millis(1), self.table.permit(&id)).await
            else {
                continue;
            };
            let r = permit.rec.clone();
            if !idle_due(&r, now_ms()) {
                continue;
            }
            let outcome = match r.idle.action {
                IdleAction::Delete => {
                    info!(bubble = %r.id, parent = %r.owner, idle_s = r.idle.timeout_s, "idle: deleting");
                    self.destroy(permit).await.map(|_| ())
                }
                IdleAction::Suspend => {
                    info!(bubble = %r.id, parent = %r.owner, idle_s = r.idle.timeout_s, "idle: suspending");
                    self.suspend_held(permit, None).await.map(|_| ())
                }
                IdleAction::Stay => Ok(()),
            };
            if let Err(e) = outcome {
                warn!(bubble = %r.id, error = %e, "idle policy failed");
            }
        }
    }

    /// Forgets FAILED and DELETED records older than the retention period
    /// (memory and registry); their bubble directories are already gone.
    pub fn collect_ended(&self) {
        let now = now_ms();
        let keep = self.cfg.record_retention.as_millis() as u64;
        let old: Vec<BubbleRecord> = self.table.with(|t| {
            t.records()
                .filter(|r| matches!(r.state, State::Failed | State::Deleted))
                .filter(|r| r.ended_at_ms > 0 && now.saturating_sub(r.ended_at_ms) >= keep)
                .cloned()
                .collect()
        });
        if old.is_empty() {
            return;
        }
        match self.registry.remove_many(&old) {
            Ok(()) => {
                let ids: Vec<String> = old.iter().map(|r| r.id.clone()).collect();
                self.table.remove(&ids);
                self.logs.remove(&ids);
                for id in &ids {
                    let _ = std::fs::remove_dir_all(self.cfg.bubble_dir(id));
                }
                info!(records = ids.len(), "collected ended records");
            }
            Err(e) => warn!(error = %e, "collecting ended records failed"),
        }
    }
}
