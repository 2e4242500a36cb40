//! Quotas per parent and host admission, checked with the table locked so
//! that concurrent creates cannot both pass.

use super::lifecycle::State;
use super::table::TableView;
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;

/// Whether a record holds resources (counts against quotas).
pub(super) fn holds_resources(r: &BubbleRecord) -> bool {
    r.state.expects_vmm() || r.state == State::Suspended
}

impl Broker {
    /// Refuses a new bubble of `memory_mib` for `parent` (empty: the pool)
    /// if it would break a quota or host admission.
    pub(super) fn admit(
        &self,
        t: &TableView<'_>,
        parent: &str,
        memory_mib: u32,
    ) -> Result<(), BrokerError> {
        let q = &self.cfg.quota;
        let host: u64 = t
            .records()
            .filter(|r| holds_resources(r))
            .map(|r| u64::from(r.memory_mib))
            .sum();
        let want = u64::from(memory_mib);
        if !parent.is_empty() {
            self.admit_parent_only(t, parent, memory_mib)?;
        }
        if host + want > self.host_limit_mib {
            return Err(BrokerError::Quota(format!(
                "host admission: bubbles use {host} MiB; {want} MiB more exceeds {} MiB ({} x host RAM)",
                self.host_limit_mib, q.host_overcommit_ratio
            )));
        }
        Ok(())
    }

    /// The parent's own quotas (a pooled bubble already counts for the host).
    pub(super) fn admit_parent_only(
        &self,
        t: &TableView<'_>,
        parent: &str,
        memory_mib: u32,
    ) -> Result<(), BrokerError> {
        let q = &self.cfg.quota;
        let (count, mem) = t
            .records()
            .filter(|r| holds_resources(r) && r.owner == parent)
            .fold((0u64, 0u64), |(n, m), r| {
                (n + 1, m + u64::from(r.memory_mib))
            });
        if count + 1 > u64::from(q.max_bubbles_per_parent) {
            return Err(BrokerError::Quota(format!(
                "parent {parent} has {count} of {} bubbles",
                q.max_bubbles_per_parent
            )));
        }
        if mem + u64::from(memory_mib) > q.max_memory_mib_per_parent {
            return Err(BrokerError::Quota(format!(
                "parent {parent} uses {mem} MiB; {memory_mib} MiB more exceeds its {} MiB",
                q.max_memory_mib_per_parent
            )));
        }
        Ok(())
    }
}
