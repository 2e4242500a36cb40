//! Operator actions across parents: describe and delete any parent's
//! bubble, drain the broker. Only for a parent id in the configuration's
//! `admins`; anyone else is refused exactly as for a bubble it does not
//! own. Every action is written to the audit log (`What::Admin`, the
//! operator as the acting parent, the bubble's owner as owner).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bubble_audit::{Entry, What};

use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;

/// How long an admin delete waits behind other operations on the bubble.
const ADMIN_DELETE_WAIT: Duration = Duration::from_secs(120);

impl Broker {
    /// Whether `parent` is a configured admin.
    pub fn is_admin(&self, parent: &str) -> bool {
        self.cfg.admins.iter().any(|a| a == parent)
    }

    /// Waits until the audit log holds everything appended so far (off the
    /// runtime's worker if called on one).
    fn flush_audit(&self) -> Result<(), BrokerError> {
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let flush = || self.audit.flush();
        if on_worker {
            tokio::task::block_in_place(flush)?;
        } else {
            flush()?;
        }
        Ok(())
    }

    fn audit_admin(&self, admin: &str, bubble: &str, owner: &str, action: &str) {
        self.audit.append(
            Entry {
                bubble: bubble.to_string(),
                owner: owner.to_string(),
                parent: admin.to_string(),
                portion_digest: String::new(),
                at_ms: 0,
            },
            What::Admin {
                action: action.to_string(),
            },
        );
    }

    /// Any bubble (pooled ones too), for an admin; `NotAccessible` for
    /// anyone else and for an id that does not exist.
    pub fn admin_describe(&self, admin: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        if !self.is_admin(admin) {
            return Err(BrokerError::NotAccessible(id.to_string()));
        }
        let rec = self
            .table
            .get(id)
            .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
        self.audit_admin(admin, id, &rec.owner, "describe");
        Ok(rec)
    }

    /// Deletes any parent's bubble, for an admin (refused as
    /// [`Broker::admin_describe`] is).
    pub async fn admin_delete(
        self: &Arc<Self>,
        admin: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        if !self.is_admin(admin) || self.table.get(id).is_none() {
            return Err(BrokerError::NotAccessible(id.to_string()));
        }
        let permit = tokio::time::timeout(ADMIN_DELETE_WAIT, self.table.permit(id))
            .await
            .map_err(|_| BrokerError::Queued(id.to_string()))?
            .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
        let owner = permit.rec.owner.clone();
        // Durable before the deletion: the record says who asked even if
        // the broker dies right after (the outcome is the lifecycle
        // record). No record, no deletion.
        self.audit_admin(admin, id, &owner, "delete");
        self.flush_audit()?;
        self.destroy(permit).await
    }

    /// Starts (`drain`) or ends draining, for an admin: while draining,
    /// create and attach are refused with UNAVAILABLE. Returns the number
    /// of bubbles still live (not DELETED, FAILED or SUSPENDED).
    pub fn admin_drain(&self, admin: &str, drain: bool) -> Result<u32, BrokerError> {
        if !self.is_admin(admin) {
            return Err(BrokerError::NotAdmin);
        }
        // Durable before it takes effect: a restarted broker stays drained.
        // One change at a time, so the registry and memory agree.
        {
            let _one = self.drain_lock.lock();
            self.registry.set_draining(drain)?;
            self.draining.store(drain, Ordering::SeqCst);
        }
        self.audit_admin(admin, "", "", if drain { "drain" } else { "undrain" });
        self.flush_audit()?;
        tracing::warn!(admin, drain, "operator changed draining");
        let live = self
            .table
            .with(|t| t.records().filter(|r| r.state.expects_vmm()).count());
        Ok(u32::try_from(live).unwrap_or(u32::MAX))
    }

    /// Whether an operator drained the broker.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Draining` while the broker is draining.
    pub(super) fn refuse_if_draining(&self) -> Result<(), BrokerError> {
        if self.draining() {
            Err(BrokerError::Draining)
        } else {
            Ok(())
        }
    }
}
