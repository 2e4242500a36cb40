//! A bubble's metering counters, as kept in its registry record.

use serde::{Deserialize, Serialize};

/// Metering counters of one bubble.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meter {
    /// Bytes of call input.
    pub bytes_in: u64,
    /// Bytes of call output.
    pub bytes_out: u64,
    /// vCPU time billed to the owner as last known, µs: that of earlier
    /// VMMs plus the current VMM's since the attach (see
    /// [`Meter::billed_vcpu`]).
    pub vcpu_us: u64,
    /// Memory-seconds accumulated over finished running periods.
    pub memory_mib_seconds: f64,
    /// Start of the current running period (Unix ms; 0 when not running).
    pub running_since_ms: u64,
    /// vCPU time of the bubble's earlier VMMs (before its last suspend),
    /// µs: a restored bubble runs in a new VMM whose counter starts at 0.
    #[serde(default)]
    pub vcpu_us_before: u64,
    /// vCPU time the current VMM had used when the bubble was attached from
    /// a warm pool, µs: not billed to the parent that attached it.
    #[serde(default)]
    pub vcpu_us_unbilled: u64,
    /// Start of billing, Unix ms: the attach of a pooled bubble (0: its
    /// creation).
    #[serde(default)]
    pub billed_from_ms: u64,
}

impl Meter {
    /// The vCPU time billed to the owner when the current VMM reports
    /// `live` µs.
    pub fn billed_vcpu(&self, live: u64) -> u64 {
        self.vcpu_us_before + live.saturating_sub(self.vcpu_us_unbilled)
    }

    /// Records that the current VMM (which reported `live` µs) ends: its
    /// time joins the earlier VMMs'.
    pub fn vmm_ended(&mut self, live: u64) {
        self.vcpu_us = self.billed_vcpu(live);
        self.vcpu_us_before = self.vcpu_us;
        self.vcpu_us_unbilled = 0;
    }

    /// Starts billing a pooled bubble's new owner at `now_ms`: memory time
    /// and bytes of the pool period are dropped; the VMM's vCPU counter as
    /// noted in the pool (`vcpu_us_unbilled`, 0 if never noted: the caller
    /// then asks the VMM) stays unbilled.
    pub fn attached(&mut self, now_ms: u64) {
        *self = Meter {
            running_since_ms: if self.running_since_ms > 0 { now_ms } else { 0 },
            billed_from_ms: now_ms,
            vcpu_us_unbilled: self.vcpu_us_unbilled,
            ..Meter::default()
        };
    }

    /// Memory-seconds up to `now_ms` for a bubble of `memory_mib`.
    pub fn memory_mib_seconds_at(&self, memory_mib: u32, now_ms: u64) -> f64 {
        let running = if self.running_since_ms > 0 {
            now_ms.saturating_sub(self.running_since_ms) as f64 / 1000.0
        } else {
            0.0
        };
        self.memory_mib_seconds + running * f64::from(memory_mib)
    }

    /// Closes the current running period at `now_ms`.
    pub fn stop_running(&mut self, memory_mib: u32, now_ms: u64) {
        self.memory_mib_seconds = self.memory_mib_seconds_at(memory_mib, now_ms);
        self.running_since_ms = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attach_keeps_the_pools_noted_vcpu_time_unbilled() {
        let mut m = Meter {
            bytes_in: 7,
            running_since_ms: 1_000,
            memory_mib_seconds: 3.0,
            vcpu_us_unbilled: 1_100,
            ..Meter::default()
        };
        m.attached(5_000);
        assert_eq!(m.vcpu_us_unbilled, 1_100);
        assert_eq!((m.bytes_in, m.memory_mib_seconds), (0, 0.0));
        assert_eq!((m.running_since_ms, m.billed_from_ms), (5_000, 5_000));
        // The owner pays what the VMM used after the note, only.
        assert_eq!(m.billed_vcpu(1_150), 50);
    }
}
