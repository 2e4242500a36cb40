//! Delete: stop the bubble's VMM, remove its files and frozen copies, and
//! record it DELETED.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::lifecycle::{State, Step};
use super::table::Permit;
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;

/// How long a delete waits behind other operations on its bubble (a call
/// runs at most its deadline).
const DELETE_WAIT: Duration = Duration::from_secs(120);

impl Broker {
    /// Deletes one of `parent`'s bubbles.
    pub async fn delete(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        // Not `permit_owned`: a bubble attached a moment ago can be deleted
        // before its owner is on disk (a crash would discard it anyway).
        self.owned(parent, id)?;
        let permit = tokio::time::timeout(DELETE_WAIT, self.table.permit(id))
            .await
            .map_err(|_| BrokerError::Queued(id.to_string()))?
            .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
        self.destroy(permit).await
    }

    /// Removes the bubble's frozen copies, records it DELETED, then stops
    /// its VMM (a running call has finished: the permit is held) and
    /// removes its files. A frozen copy that cannot be removed keeps the
    /// bubble SUSPENDED, and a registry that cannot record the deletion
    /// keeps it running (either way the delete can be retried).
    pub(super) async fn destroy(
        self: &Arc<Self>,
        permit: Permit,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = &permit.rec;
        let id = &rec.id;
        if rec.state == State::Deleted {
            return Ok(rec.clone());
        }
        // Every copy its record can have made: a suspended bubble's, and a
        // consumed one whose deletion failed after a restore.
        self.frozen
            .purge(id, rec.generation, &self.broker_id)
            .await?;
        // DELETED is durable before anything irreversible happens to a
        // running bubble: if the registry cannot record it (a full disk),
        // the bubble runs on and the caller gets the error. A crash after
        // the commit leaves a VMM that the next start stops.
        let live = self.table.live_of(id);
        let vcpu_us = match &live {
            Some(l) => l.vmm.vcpu_us().await,
            None => None,
        };
        let r = self.apply(id, Step::Deleted, "", |r| {
            r.vmm_pid = 0;
            r.frozen = None;
            if let Some(v) = vcpu_us {
                r.usage.vmm_ended(v);
            }
        });
        if r.is_ok() {
            if let Some(live) = self.table.set_live(id, None) {
                live.vmm.shutdown().await;
            }
            let _ = std::fs::remove_dir_all(self.cfg.bubble_dir(id));
            info!(bubble = %id, parent = %rec.owner, "bubble deleted");
        }
        self.pool_changed.notify_waiters();
        r
    }
}
