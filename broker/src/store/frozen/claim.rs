//! Who may use or remove a frozen copy: the claim a restoring broker
//! takes on it (one broker per generation, across every broker sharing the
//! store), and purging every copy of a deleted bubble.

use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{prefix, store_err, FrozenStore};
use crate::error::BrokerError;

/// What a claim object says: which broker restores the copy, since when.
#[derive(Serialize, Deserialize)]
struct ClaimBody {
    broker: String,
    at_ms: u64,
}

/// Why a frozen copy could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another broker holds the claim: it restores (or restored) the copy.
    #[error("the frozen copy is being restored by another broker")]
    Taken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] BrokerError),
}

impl FrozenStore {
    /// Claims a frozen copy for restoring by `broker` (a stable broker
    /// identity) with a conditional create of its `claim` object: of any
    /// number of brokers sharing the store, exactly one gets it. A claim
    /// the same broker made before a crash is its own again.
    pub async fn claim(&self, id: &str, generation: u64, broker: &str) -> Result<(), ClaimError> {
        let path = ObjPath::from(format!("{}/claim", prefix(id, generation)));
        let body = ClaimBody {
            broker: broker.to_string(),
            at_ms: crate::clock::now_ms(),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| BrokerError::Store(e.to_string()))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        // A claim seen and gone before it could be read was given back (or
        // its copy consumed): try again, a few times.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes.clone()), opts.clone())
                .await
            {
                Ok(_) => break,
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let held = match self.store.get(&path).await {
                        Ok(h) => h.bytes().await.map_err(store_err)?,
                        Err(object_store::Error::NotFound { .. }) if attempts < 4 => continue,
                        Err(object_store::Error::NotFound { .. }) => return Err(ClaimError::Taken),
                        Err(e) => return Err(store_err(e).into()),
                    };
                    match serde_json::from_slice::<ClaimBody>(&held) {
                        Ok(c) if c.broker == broker => break,
                        _ => return Err(ClaimError::Taken),
                    }
                }
                Err(e) => return Err(store_err(e).into()),
            }
        }
        // A consumed copy loses its manifest before its claim: a claim won
        // after another broker consumed the copy finds no manifest.
        let manifest = ObjPath::from(format!("{}/manifest", prefix(id, generation)));
        match self.store.head(&manifest).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => {
                self.release(id, generation).await;
                Err(BrokerError::FrozenMissing.into())
            }
            Err(e) => Err(store_err(e).into()),
        }
    }

    /// Gives a claim back (a restore that failed before the bubble ran).
    pub async fn release(&self, id: &str, generation: u64) {
        let path = ObjPath::from(format!("{}/claim", prefix(id, generation)));
        let _ = self.store.delete(&path).await;
    }

    /// Deletes every frozen copy of a bubble (all generations, manifest
    /// first so that nothing half-deleted can be restored): a deleted
    /// bubble leaves nothing in the store.
    pub async fn purge(&self, id: &str) -> Result<(), BrokerError> {
        use futures::TryStreamExt;
        let base = ObjPath::from(format!("frozen/{id}"));
        let mut objects: Vec<ObjPath> = self
            .store
            .list(Some(&base))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(store_err)?;
        // Manifests first.
        objects.sort_by_key(|p| !p.as_ref().ends_with("/manifest"));
        for p in objects {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        if let Some(root) = &self.local_root {
            let _ = std::fs::remove_dir_all(root.join(base.as_ref()));
        }
        Ok(())
    }
}
