//! How an await ends other than by its event or its timeout: its bubble
//! is deleted (the origin gets a typed `AwaitCancelled` failure) or
//! restored by its owner (the pending call is resumed at once with the
//! timeout, and its answer is the origin's result); and how a broker that
//! restored an await's bubble but died before RESUME finishes it after
//! its restart (the bubble runs here, re-adopted, its call pending).

use std::collections::HashSet;
use std::sync::Arc;

use bubble_abi::Resume;
use bubble_events::Outcome;
use tracing::{info, warn};

use super::awaits::Resumed;
use super::commands::Restore;
use super::Broker;
use crate::error::BrokerError;
use crate::store::registry::awaits::{AwaitPhase, AwaitRecord};
use crate::store::registry::{BubbleRecord, State};

impl Broker {
    /// Whether await `a`'s bubble runs here, restored from the generation
    /// the await froze and not frozen since: its call is still pending
    /// inside (the await is not ENDED).
    pub(super) fn restored_here(&self, a: &AwaitRecord) -> bool {
        self.table.get(&a.bubble_id).is_some_and(|r| {
            r.owner == a.owner
                && r.generation == a.generation
                && r.frozen.is_none()
                && matches!(r.state, State::Ready | State::Busy)
        })
    }

    /// The live awaits of `owner`'s bubble `bubble_id`: this registry's,
    /// and the shared index's when `index` (a listing of the whole index:
    /// only for a bubble that was frozen), each as the index has it now.
    async fn awaits_of(&self, owner: &str, bubble_id: &str, index: bool) -> Vec<AwaitRecord> {
        let mut found = self.registry.awaits().unwrap_or_default();
        if index {
            match self.frozen.list_awaits().await {
                Ok(v) => found.extend(v),
                Err(e) => warn!(bubble = %bubble_id, error = %e, "listing the await index failed"),
            }
        }
        let mut seen = HashSet::new();
        let mut live = Vec::new();
        for a in found {
            if a.owner != owner || a.bubble_id != bubble_id || !seen.insert(a.id.clone()) {
                continue;
            }
            if let Ok(Some(now)) = self.find_await(&a.owner, &a.key).await {
                if now.bubble_id == bubble_id && now.phase != AwaitPhase::Ended {
                    live.push(now);
                }
            }
        }
        live
    }

    /// The owner deletes a bubble: also ends its awaits, each origin
    /// getting a typed `AwaitCancelled` failure.
    pub async fn delete_ending_awaits(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = self.delete(parent, id).await?;
        // The index is always consulted: an await of this bubble may be
        // known only there (another broker froze it, this one restored it
        // after a crash and holds it running, not frozen).
        for a in self.awaits_of(parent, id, true).await {
            // A resume of it in flight here ends it itself.
            let Some(_held) = self.awaits.hold(&a.id) else {
                continue;
            };
            // Read before the hold: a resume here may have ended it since.
            let a = match self.find_await(&a.owner, &a.key).await {
                Ok(Some(now))
                    if super::awaits::same_instance(&now, &a) && now.phase != AwaitPhase::Ended =>
                {
                    now
                }
                _ => continue,
            };
            let outcome = Outcome::Failed(super::awaits::cut(&BrokerError::AwaitCancelled(
                id.to_string(),
            )));
            info!(bubble = %id, parent = %parent, key = %a.key, "an awaiting bubble was deleted: its await ends");
            self.publish_origin(&a, &outcome).await;
            self.relay_result(&a, &outcome).await;
            let mut done = a;
            done.phase = AwaitPhase::Ended;
            self.end_await(&done).await;
        }
        Ok(rec)
    }

    /// The owner restores a bubble (`RestoreBubble`): if a call of it was
    /// awaiting, the restored bubble cannot wait frozen any more, so the
    /// call is resumed at once with the timeout and its answer is the
    /// await's result (published where its origin's results go); the
    /// await ends. Returns the bubble as it is then.
    pub async fn restore_ending_awaits(
        self: &Arc<Self>,
        parent: &str,
        cmd: Restore,
    ) -> Result<BubbleRecord, BrokerError> {
        let id = cmd.bubble_id.clone();
        let imported = cmd.generation > 0;
        let rec = self.restore(parent, cmd).await?;
        for a in self.awaits_of(parent, &id, imported).await {
            if !self.restored_here(&a) {
                continue;
            }
            info!(bubble = %id, parent = %parent, key = %a.key, "an awaiting bubble was restored by its owner: its call is timed out");
            match self.resume_record(a, Resume::Timeout).await {
                Ok(Resumed::Done(_) | Resumed::AwaitsAgain) => {}
                Ok(r) => warn!(bubble = %id, ?r, "a restored bubble's await was not ended here"),
                Err(e) => {
                    warn!(bubble = %id, error = %e, "timing out a restored bubble's await failed")
                }
            }
        }
        Ok(self.table.get(&id).unwrap_or(rec))
    }
}
