//! Keeping a claim alive while a restore runs: a task renews its lease
//! every third of it until the restore takes the claim back to commit it
//! (or give it back).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::warn;

use super::claim::{Claim, ClaimError};
use super::FrozenStore;

/// A held claim and the task renewing it.
pub struct ClaimKeeper {
    claim: Arc<Mutex<Option<Claim>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ClaimKeeper {
    /// Starts renewing `claim` every third of the store's lease.
    pub fn start(store: FrozenStore, claim: Claim) -> Self {
        let every = store.lease() / 3;
        let claim = Arc::new(Mutex::new(Some(claim)));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (claim.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let mut held = c.lock().await;
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Some(claim) = held.as_mut() else {
                    return;
                };
                match store.renew(claim).await {
                    Ok(()) => {}
                    // Taken over: the commit will find out and refuse.
                    Err(ClaimError::Lost | ClaimError::Taken) => {
                        warn!(token = claim.token(), "claim lost while restoring");
                        return;
                    }
                    // The store failed this time: try again next period
                    // (if it stays down past the lease, the commit fails).
                    Err(ClaimError::Store(e)) => warn!(error = %e, "claim renewal failed"),
                }
            }
        });
        Self { claim, stop, task }
    }

    /// Stops renewing and hands the claim back to the restore. A renewal
    /// in flight finishes first (so the claim's version is the latest).
    pub async fn finish(self) -> Option<Claim> {
        self.stop.store(true, Ordering::Release);
        let claim = self.claim.lock().await.take();
        self.task.abort();
        claim
    }
}
