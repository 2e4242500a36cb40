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
        let path = claim_path(id, generation);
        // A claim seen and gone before it could be read was given back (or
        // its copy consumed): try again, a few times.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.create_claim(&path, broker).await {
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

    /// Creates the claim object naming `broker`, only if none exists
    /// (`PutMode::Create`: one winner among concurrent creators).
    async fn create_claim(&self, path: &ObjPath, broker: &str) -> Result<(), object_store::Error> {
        let body = ClaimBody {
            broker: broker.to_string(),
            at_ms: crate::clock::now_ms(),
        };
        // Serializing a struct of a string and an integer cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
            .map(|_| ())
    }

    /// Gives a claim back (a restore that failed before the bubble ran).
    pub async fn release(&self, id: &str, generation: u64) {
        let path = claim_path(id, generation);
        let _ = self.store.delete(&path).await;
    }

    /// Reserves generation `generation` of a bubble for a suspend by
    /// `broker`: removes whatever an earlier, uncommitted attempt left there
    /// (a crash between storing and committing), then takes the claim, so
    /// that no broker can import the copy until the suspend is committed
    /// and [`FrozenStore::release`] gives the claim up.
    pub async fn reserve(&self, id: &str, generation: u64, broker: &str) -> Result<(), ClaimError> {
        if let Some(other) = self.claimant(id, generation).await? {
            if other != broker {
                return Err(ClaimError::Taken);
            }
        }
        self.purge_generation(id, generation).await?;
        match self.create_claim(&claim_path(id, generation), broker).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(ClaimError::Taken),
            Err(e) => Err(store_err(e).into()),
        }
    }

    /// The broker holding a generation's claim, if any.
    async fn claimant(&self, id: &str, generation: u64) -> Result<Option<String>, BrokerError> {
        let path = claim_path(id, generation);
        match self.store.get(&path).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(store_err)?;
                Ok(Some(
                    serde_json::from_slice::<ClaimBody>(&b)
                        .map(|c| c.broker)
                        .unwrap_or_default(),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Deletes everything under one generation (manifest first).
    pub async fn purge_generation(&self, id: &str, generation: u64) -> Result<(), BrokerError> {
        self.delete_under(&prefix(id, generation)).await
    }

    /// Deletes a bubble's frozen copies of generations up to `upto` (all a
    /// deleted bubble's record can have made), manifest first so that
    /// nothing half-deleted can be restored, except a generation another
    /// broker holds the claim of (it runs the bubble now).
    pub async fn purge(&self, id: &str, upto: u64, broker: &str) -> Result<(), BrokerError> {
        use futures::TryStreamExt;
        let base = ObjPath::from(format!("frozen/{id}"));
        let mut gens: Vec<u64> = self
            .store
            .list(Some(&base))
            .map_ok(|m| {
                m.location
                    .parts()
                    .find_map(|p| p.as_ref().strip_prefix('g')?.parse::<u64>().ok())
            })
            .try_collect::<Vec<_>>()
            .await
            .map_err(store_err)?
            .into_iter()
            .flatten()
            .filter(|g| *g <= upto)
            .collect();
        gens.sort_unstable();
        gens.dedup();
        for g in gens {
            match self.claimant(id, g).await? {
                Some(other) if other != broker => continue,
                _ => self.purge_generation(id, g).await?,
            }
        }
        Ok(())
    }

    async fn delete_under(&self, base: &str) -> Result<(), BrokerError> {
        use futures::TryStreamExt;
        let dir = ObjPath::from(base);
        let mut objects: Vec<ObjPath> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(store_err)?;
        // Manifests first, claims last.
        objects.sort_by_key(|p| {
            let n = p.filename().unwrap_or_default();
            match n {
                "manifest" => 0,
                "claim" => 2,
                _ => 1,
            }
        });
        for p in objects {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        if let Some(root) = &self.local_root {
            let d = root.join(base);
            let _ = std::fs::remove_dir(&d);
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

/// Where a generation's claim object is.
fn claim_path(id: &str, generation: u64) -> ObjPath {
    ObjPath::from(format!("{}/claim", prefix(id, generation)))
}
