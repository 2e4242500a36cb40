//! Metering (usage per bubble, counters flushed to the registry) and the
//! scrape-time metrics.

use std::collections::HashMap;

use super::lifecycle::{self, State};
use super::{now_ms, Broker};
use crate::error::BrokerError;
use crate::obs::metrics::{ParentLabel, ProfileLabel, StateLabel};

/// The `bubbled_bubbles` state label of warm-pool bubbles (not yet any
/// parent's, whatever their lifecycle state).
const POOLED: &str = "POOLED";
use crate::store::registry::BubbleRecord;

/// A bubble's usage, as the broker signs it.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageFacts {
    /// The bubble.
    pub bubble_id: String,
    /// Its owner.
    pub owner: String,
    /// vCPU time, µs.
    pub vcpu_us: u64,
    /// Memory held over time.
    pub memory_mib_seconds: f64,
    /// Completed calls.
    pub calls: u64,
    /// Input bytes.
    pub bytes_in: u64,
    /// Output bytes.
    pub bytes_out: u64,
    /// Since (creation), Unix ms.
    pub from_ms: u64,
    /// Until (now), Unix ms.
    pub to_ms: u64,
}

impl Broker {
    /// Usage of one of `parent`'s bubbles.
    pub async fn usage(&self, parent: &str, id: &str) -> Result<UsageFacts, BrokerError> {
        let rec = self.owned(parent, id)?;
        let mut vcpu_us = rec.usage.vcpu_us;
        if let Some(live) = self.table.live_of(id) {
            if let Some(v) = live.vmm.vcpu_us().await {
                vcpu_us = self.table.with(|t| match t.record_mut(id) {
                    Some(r) => {
                        r.usage.vcpu_us = r.usage.billed_vcpu(v);
                        r.usage.vcpu_us
                    }
                    None => rec.usage.billed_vcpu(v),
                });
            }
        }
        let now = now_ms();
        Ok(UsageFacts {
            bubble_id: rec.id.clone(),
            owner: rec.owner.clone(),
            vcpu_us,
            memory_mib_seconds: rec.usage.memory_mib_seconds_at(rec.memory_mib, now),
            calls: rec.calls,
            bytes_in: rec.usage.bytes_in,
            bytes_out: rec.usage.bytes_out,
            from_ms: if rec.usage.billed_from_ms > 0 {
                rec.usage.billed_from_ms
            } else {
                rec.created_at_ms
            },
            to_ms: now,
        })
    }

    /// Persists records whose counters changed since the last flush.
    pub fn flush_counters(&self) {
        let ids: Vec<String> = self.dirty.lock().drain().collect();
        if ids.is_empty() {
            return;
        }
        // Read and written under the step lock: a flush never writes a
        // record older than a lifecycle step committed meanwhile.
        let _serial = self.apply_serial.lock();
        let recs: Vec<BubbleRecord> = ids.iter().filter_map(|id| self.table.get(id)).collect();
        if let Err(e) = self.registry.put_many(&recs) {
            tracing::warn!(error = %e, "flushing counters failed");
        }
    }

    /// Spare VMM processes ready, and how many are wanted.
    pub fn spares(&self) -> (usize, usize) {
        self.spawner.spares()
    }

    /// Updates the scrape-time gauges and renders all metrics.
    pub fn scrape(&self) -> String {
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        let mut pools: HashMap<String, i64> =
            self.cfg.pools.iter().map(|p| (p.name.clone(), 0)).collect();
        let mut parents: HashMap<String, (i64, i64)> = HashMap::new();
        self.table.with(|t| {
            for r in t.records() {
                if r.owner.is_empty() {
                    // A warm-pool bubble is nobody's yet: POOLED, not READY.
                    *by_state.entry(POOLED).or_default() += 1;
                    if r.state == State::Ready {
                        *pools.entry(r.profile.clone()).or_default() += 1;
                    }
                    continue;
                }
                *by_state.entry(lifecycle::name(r.state)).or_default() += 1;
                if !matches!(r.state, State::Deleted | State::Failed) {
                    let p = parents.entry(r.owner.clone()).or_default();
                    p.0 += 1;
                    p.1 += i64::from(r.memory_mib);
                }
            }
        });
        // Parents without live bubbles drop out.
        self.metrics.parent_bubbles.clear();
        self.metrics.parent_memory_mib.clear();
        for (parent, (n, mib)) in parents {
            let label = ParentLabel { parent };
            self.metrics.parent_bubbles.get_or_create(&label).set(n);
            self.metrics
                .parent_memory_mib
                .get_or_create(&label)
                .set(mib);
        }
        for s in lifecycle::STATES
            .map(lifecycle::name)
            .into_iter()
            .chain([POOLED])
        {
            self.metrics
                .bubbles
                .get_or_create(&StateLabel { state: s.into() })
                .set(by_state.get(s).copied().unwrap_or(0));
        }
        for (p, n) in pools {
            self.metrics
                .pool_depth
                .get_or_create(&ProfileLabel { profile: p })
                .set(n);
        }
        self.metrics.encode()
    }
}
