//! Owners of bubbles attached from a warm pool reach the disk in group
//! commits; nothing runs in such a bubble until its owner is durable.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::BubbleRecord;

/// How long an operation waits for its bubble's attach to reach the disk.
const OWNER_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

impl Broker {
    /// Writes pending pool assignments (owner and request id) in one
    /// durable transaction, as soon as there are any (group commit).
    pub(super) async fn owner_flusher(me: std::sync::Weak<Self>, kick: Arc<tokio::sync::Notify>) {
        loop {
            // A kick while a flush runs leaves a permit: nothing is missed.
            let kicked = tokio::time::timeout(Duration::from_secs(1), kick.notified()).await;
            let Some(b) = me.upgrade() else { return };
            if kicked.is_err() && b.unsynced_owners.lock().is_empty() {
                continue;
            }
            if let Err(e) = b.sync_owners_now().await {
                warn!(error = %e, "persisting attach assignments failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                kick.notify_one();
            }
        }
    }

    /// Persists every pending pool assignment now (durably), then wakes
    /// the operations waiting for them.
    pub async fn sync_owners_now(self: &Arc<Self>) -> Result<(), BrokerError> {
        let ids: Vec<String> = self.unsynced_owners.lock().iter().cloned().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let b = self.clone();
        let wanted = ids.clone();
        tokio::task::spawn_blocking(move || {
            // Under the step lock, read then: never a record older than a
            // lifecycle step committed meanwhile.
            let _serial = b.apply_serial.lock();
            let recs: Vec<BubbleRecord> = wanted.iter().filter_map(|id| b.table.get(id)).collect();
            b.registry.assign_many(&recs)
        })
        .await
        .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))??;
        {
            let mut u = self.unsynced_owners.lock();
            for id in &ids {
                u.remove(id);
            }
        }
        self.owners_synced.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Like [`Broker::owned`], and waits until the bubble's owner is on
    /// disk (a bubble attached from the pool a moment ago): nothing runs in
    /// a bubble whose ownership a crash could still undo.
    pub(super) async fn owned_synced(
        &self,
        parent: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = self.owned(parent, id)?;
        let mut synced = self.owners_synced.subscribe();
        let deadline = tokio::time::Instant::now() + OWNER_SYNC_TIMEOUT;
        while self.unsynced_owners.lock().contains(id) {
            match tokio::time::timeout_at(deadline, synced.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(BrokerError::Unavailable(
                        "the bubble's owner could not be recorded on disk yet".into(),
                    ))
                }
            }
        }
        Ok(rec)
    }
}
