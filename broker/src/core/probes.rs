//! Health probes of pooled bubbles: every [`PROBE_INTERVAL`] (± half, at
//! random) each READY bubble waiting in a warm pool is checked (its VMM
//! process is alive and the guest answers an `echo` within
//! [`PROBE_DEADLINE`]); one that fails has its VMM killed and is FAILED
//! with the probe's reason,
//! so it leaves the pool and the refiller replaces it before anyone
//! attaches it. The last result shows in `DescribeBubble` (`health`).

use std::sync::Arc;
use std::time::Duration;

use super::lifecycle::State;
use super::{now_ms, Broker};
use crate::vmm::{FailureKind, FailureReason};

/// Mean time between two probe rounds.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long the guest may take to answer a probe.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(500);
/// How long a probe waits for a bubble busy with another operation
/// (then it skips it this round).
const PERMIT_WAIT: Duration = Duration::from_millis(50);

/// A bubble's last probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    /// Why it failed (empty: healthy).
    pub problem: String,
    /// When, Unix ms.
    pub at_ms: u64,
}

impl Probed {
    /// As shown in `DescribeBubble`.
    pub fn describe(&self) -> String {
        if self.problem.is_empty() {
            format!("healthy (probed at {} ms)", self.at_ms)
        } else {
            format!("unhealthy: {} (probed at {} ms)", self.problem, self.at_ms)
        }
    }
}

/// A random duration in [interval/2, 3·interval/2).
fn jittered(interval: Duration) -> Duration {
    let mut b = [0u8; 4];
    let r =
        getrandom::fill(&mut b).map_or(0.5, |()| f64::from(u32::from_le_bytes(b)) / 4294967296.0);
    interval.mul_f64(0.5 + r)
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

impl Broker {
    /// Probes pooled bubbles while the broker lives.
    pub(super) async fn probe_loop(me: std::sync::Weak<Self>) {
        loop {
            tokio::time::sleep(jittered(PROBE_INTERVAL)).await;
            let Some(b) = me.upgrade() else { return };
            if b.closing() {
                return;
            }
            let ids: Vec<String> = b.table.with(|t| {
                t.records()
                    .filter(|r| r.owner.is_empty() && !r.profile.is_empty())
                    .filter(|r| r.state == State::Ready)
                    .map(|r| r.id.clone())
                    .collect()
            });
            for id in ids {
                b.probe_one(&id).await;
            }
            // Forget bubbles that are gone.
            let known: std::collections::HashSet<String> = b
                .table
                .with(|t| t.records().map(|r| r.id.clone()).collect());
            b.probes.lock().retain(|id, _| known.contains(id));
        }
    }

    /// Probes one pooled bubble; fails it if it does not answer.
    async fn probe_one(self: &Arc<Self>, id: &str) {
        let Ok(Some(permit)) = tokio::time::timeout(PERMIT_WAIT, self.table.permit(id)).await
        else {
            return;
        };
        if permit.rec.state != State::Ready || !permit.rec.owner.is_empty() {
            return;
        }
        let Some(live) = permit.live.clone() else {
            return;
        };
        let gone = !pid_alive(live.vmm.pid());
        let problem = if gone {
            format!("VMM process {} is gone", live.vmm.pid())
        } else {
            let echo = tokio::time::timeout(
                PROBE_DEADLINE * 2,
                live.vmm
                    .call(bubble_abi::ops::OP_ECHO, b"probe", PROBE_DEADLINE),
            )
            .await;
            match echo {
                Ok(Ok(out)) if out == b"probe" => String::new(),
                Ok(Ok(_)) => "wrong answer to an echo".into(),
                Ok(Err(e)) => format!("echo failed: {e:?}"),
                Err(_) => format!("no answer to an echo within {:?}", PROBE_DEADLINE * 2),
            }
        };
        let healthy = problem.is_empty();
        if healthy {
            // The probe's own vCPU time is the pool's, not the next owner's.
            self.note_pool_vcpu(id).await;
        }
        drop(permit);
        let result = if healthy { "healthy" } else { "unhealthy" };
        self.metrics
            .pool_probes
            .get_or_create(&crate::obs::metrics::ResultLabel { result })
            .inc();
        self.probes.lock().insert(
            id.to_string(),
            Probed {
                problem: problem.clone(),
                at_ms: now_ms(),
            },
        );
        if !healthy {
            tracing::warn!(bubble = %id, %problem, "pooled bubble failed its health probe");
            // A hung VMM may not take a shutdown request: end it now. A
            // VMM already gone is not signalled (its pid may be reused).
            if !gone {
                live.vmm.kill();
            }
            let reason =
                FailureReason::new(FailureKind::Internal, format!("health probe: {problem}"));
            self.fail(id, &reason);
        }
    }

    /// A bubble's last probe, if it was probed.
    pub fn probed(&self, id: &str) -> Option<Probed> {
        self.probes.lock().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_an_interval() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d < Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
