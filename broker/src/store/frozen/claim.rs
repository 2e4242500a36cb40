//! Who may use or remove a frozen copy: the claim a restoring (or
//! suspending) broker takes on it — one broker per generation, across
//! every broker sharing the store — with a lease and a fencing token, and
//! purging every copy of a deleted bubble.
//!
//! A claim object names its broker, a token and an expiry. It is only ever
//! written by compare-and-swap ([`super::cas`]): created if absent, or
//! replaced if it is still the version its writer read. A live claimant
//! renews its lease (same token); a claim past its lease, or given back,
//! is taken over with the next token — except a suspend's claim, which
//! no other broker takes, ever (see `Purpose::Suspend`). Committing a restore is itself a
//! conditional write of the claim (to `committed`), so a claimant whose
//! claim was taken over (it was paused past its lease) cannot commit: its
//! write finds another version and fails with [`ClaimError::Lost`].

use std::time::Duration;

use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::cas::{CasError, Version};
use super::{prefix, store_err, FrozenStore};
use crate::error::BrokerError;

/// Where a claim is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum ClaimState {
    /// A broker restores (or suspends) the copy until `expires_ms`.
    #[default]
    Held,
    /// The restore is committed: the copy is consumed, nobody takes it.
    Committed,
    /// Given back: anyone may take it.
    Released,
}

/// What a held claim is for.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
enum Purpose {
    /// Restoring a committed copy: past its lease, anyone may take it over
    /// (the copy is the bubble's only state; a dead claimant's restore
    /// never ran it).
    #[default]
    Restore,
    /// Storing a new copy of a bubble that still runs on the claimant:
    /// nobody else may ever take it, lease or not. Until the claimant
    /// records the suspend and gives the claim back, the copy is not the
    /// bubble's state: its VMM still holds it, and a broker that restarts
    /// after dying mid-suspend re-adopts that VMM and runs the bubble on.
    Suspend,
}

/// What a claim object says.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct ClaimBody {
    broker: String,
    at_ms: u64,
    /// The fencing token: one more at every takeover.
    #[serde(default)]
    token: u64,
    /// One more at every write (so no two versions have equal bytes).
    #[serde(default)]
    seq: u64,
    /// The lease's end (wall clock, ms). Claims written before leases
    /// existed have 0: expired.
    #[serde(default)]
    expires_ms: u64,
    #[serde(default)]
    state: ClaimState,
    #[serde(default)]
    purpose: Purpose,
}

impl ClaimBody {
    fn bytes(&self) -> Vec<u8> {
        // Serializing strings, integers and a unit enum cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether another broker may take this claim over now.
    fn takeable_by(&self, broker: &str, now: u64) -> bool {
        match self.state {
            ClaimState::Committed => false,
            ClaimState::Released => true,
            ClaimState::Held => {
                self.broker == broker
                    || (self.purpose == Purpose::Restore && self.expires_ms <= now)
            }
        }
    }
}

/// A claim this broker holds: what it needs to renew, commit or give it
/// back, and nothing else can (the version is the fence).
#[derive(Debug)]
pub struct Claim {
    path: ObjPath,
    body: ClaimBody,
    version: Version,
}

impl Claim {
    /// The fencing token this claim was taken with.
    pub fn token(&self) -> u64 {
        self.body.token
    }
}

/// Why a frozen copy could not be claimed, or a claim not kept.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another broker holds the claim: it restores (or restored) the copy.
    #[error("the frozen copy is being restored by another broker")]
    Taken,
    /// This broker's claim was taken over (its lease ran out) or removed:
    /// it must not commit anything for the copy.
    #[error("the claim on the frozen copy was lost (lease expired and taken over)")]
    Lost,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] BrokerError),
}

impl From<CasError> for ClaimError {
    fn from(e: CasError) -> Self {
        match e {
            CasError::Conflict => ClaimError::Lost,
            CasError::Store(e) => ClaimError::Store(e),
        }
    }
}

impl FrozenStore {
    /// Sets how long a claim lasts without renewal.
    pub fn set_lease(&mut self, lease: Duration) {
        self.lease = lease;
    }

    /// How long a claim lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn expiry(&self) -> u64 {
        crate::clock::now_ms().saturating_add(self.lease.as_millis() as u64)
    }

    /// The claim object of a generation, parsed, with its version.
    async fn read_claim(
        &self,
        path: &ObjPath,
    ) -> Result<Option<(ClaimBody, Version)>, BrokerError> {
        let Some((bytes, v)) = self.cas_read(path).await? else {
            return Ok(None);
        };
        // An unreadable claim object is held by nobody known, for no
        // known time: treated as expired (its version still fences).
        let body = serde_json::from_slice(&bytes).unwrap_or(ClaimBody {
            broker: String::new(),
            at_ms: 0,
            token: 0,
            seq: 0,
            expires_ms: 0,
            state: ClaimState::Held,
            purpose: Purpose::Restore,
        });
        Ok(Some((body, v)))
    }

    /// Takes the claim of `path` for `broker` if nobody holds it: creates
    /// it, or takes over one given back, past its lease or this broker's
    /// own (from before a restart), with the next token.
    async fn take(
        &self,
        path: &ObjPath,
        broker: &str,
        purpose: Purpose,
    ) -> Result<Claim, ClaimError> {
        for _ in 0..4 {
            let current = self.read_claim(path).await?;
            let now = crate::clock::now_ms();
            let (token, expect) = match &current {
                None => (1, None),
                Some((b, _)) if !b.takeable_by(broker, now) => return Err(ClaimError::Taken),
                Some((b, v)) => (b.token.saturating_add(1), Some(v)),
            };
            let body = ClaimBody {
                broker: broker.to_string(),
                at_ms: now,
                token,
                seq: current.as_ref().map_or(0, |(b, _)| b.seq.saturating_add(1)),
                expires_ms: self.expiry(),
                state: ClaimState::Held,
                purpose,
            };
            match self.cas_write(path, expect, body.bytes()).await {
                Ok(version) => {
                    return Ok(Claim {
                        path: path.clone(),
                        body,
                        version,
                    })
                }
                // Someone wrote it between the read and the write: look
                // again.
                Err(CasError::Conflict) => continue,
                Err(CasError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ClaimError::Taken)
    }

    /// Claims a frozen copy for restoring by `broker` (a stable broker
    /// identity): of any number of brokers sharing the store, exactly one
    /// holds it at a time.
    pub async fn claim(
        &self,
        id: &str,
        generation: u64,
        broker: &str,
    ) -> Result<Claim, ClaimError> {
        let claim = self
            .take(&claim_path(id, generation), broker, Purpose::Restore)
            .await?;
        // A consumed copy loses its manifest before its claim: a claim won
        // after another broker consumed the copy finds no manifest.
        let manifest = ObjPath::from(format!("{}/manifest", prefix(id, generation)));
        match self.store.head(&manifest).await {
            Ok(_) => Ok(claim),
            Err(object_store::Error::NotFound { .. }) => {
                self.release(claim).await;
                Err(BrokerError::FrozenMissing.into())
            }
            Err(e) => Err(store_err(e).into()),
        }
    }

    /// Extends a held claim's lease (same token). Fails with
    /// [`ClaimError::Lost`] if it is no longer the version this broker
    /// wrote.
    pub async fn renew(&self, claim: &mut Claim) -> Result<(), ClaimError> {
        self.rewrite(claim, ClaimState::Held).await
    }

    /// Commits the restore the claim was for: from now on nobody can take
    /// the copy. Fails with [`ClaimError::Lost`] (nothing written) if the
    /// claim was taken over or removed meanwhile.
    pub async fn commit(&self, claim: &mut Claim) -> Result<(), ClaimError> {
        self.rewrite(claim, ClaimState::Committed).await
    }

    async fn rewrite(&self, claim: &mut Claim, state: ClaimState) -> Result<(), ClaimError> {
        let mut body = claim.body.clone();
        body.seq = body.seq.saturating_add(1);
        body.expires_ms = self.expiry();
        body.state = state;
        let bytes = body.bytes();
        let version = match self
            .cas_write(&claim.path, Some(&claim.version), bytes.clone())
            .await
        {
            Ok(v) => v,
            // A store error may come after the write was made (a lost
            // answer): the claim is what this broker wrote only if it
            // reads back byte for byte (its seq makes it unique).
            Err(CasError::Store(e)) => match self.cas_read(&claim.path).await {
                Ok(Some((now, v))) if now == bytes => v,
                _ => return Err(ClaimError::Store(e)),
            },
            Err(CasError::Conflict) => return Err(ClaimError::Lost),
        };
        claim.body = body;
        claim.version = version;
        Ok(())
    }

    /// Gives a claim back (a restore that failed before the bubble ran, a
    /// committed suspend), if it is still this broker's: a claim taken
    /// over meanwhile stays its new holder's.
    pub async fn release(&self, mut claim: Claim) {
        if let Err(e) = self.rewrite(&mut claim, ClaimState::Released).await {
            tracing::info!(claim = %claim.path, error = %e, "claim not given back");
        }
    }

    /// Reserves generation `generation` of a bubble for a suspend by
    /// `broker`: removes whatever an earlier, uncommitted attempt left there
    /// (a crash between storing and committing), then takes the claim, so
    /// that no broker can import the copy until the suspend is committed
    /// and [`FrozenStore::release`] gives the claim up.
    pub async fn reserve(
        &self,
        id: &str,
        generation: u64,
        broker: &str,
    ) -> Result<Claim, ClaimError> {
        let path = claim_path(id, generation);
        if let Some((held, _)) = self.read_claim(&path).await? {
            if !held.takeable_by(broker, crate::clock::now_ms()) {
                return Err(ClaimError::Taken);
            }
        }
        self.purge_generation(id, generation).await?;
        match self.take(&path, broker, Purpose::Suspend).await {
            Ok(c) => Ok(c),
            Err(ClaimError::Lost) => Err(ClaimError::Taken),
            Err(e) => Err(e),
        }
    }

    /// Gives back this broker's claim on a generation its registry records
    /// as SUSPENDED, for a restarted broker (after it stopped every VMM its
    /// registry does not run): a suspend claim still held (it died after
    /// recording the suspend, before giving the claim back) or a restore
    /// claim it committed (it died before recording READY). The copy is
    /// the bubble's state now, restorable anywhere. Any other claim is
    /// left as it is.
    pub async fn release_suspended(
        &self,
        id: &str,
        generation: u64,
        broker: &str,
    ) -> Result<(), ClaimError> {
        let path = claim_path(id, generation);
        let Some((body, version)) = self.read_claim(&path).await? else {
            return Ok(());
        };
        // Its own suspend claim still held (died between recording the
        // suspend and giving the claim back), or its own restore claim
        // committed (died between committing and recording READY: the VMM
        // it loaded was never recorded, and the restart stopped it).
        let own_suspend = body.state == ClaimState::Held && body.purpose == Purpose::Suspend;
        let own_restore = body.state == ClaimState::Committed && body.purpose == Purpose::Restore;
        if body.broker != broker || !(own_suspend || own_restore) {
            return Ok(());
        }
        let mut claim = Claim {
            path,
            body,
            version,
        };
        self.rewrite(&mut claim, ClaimState::Released).await
    }

    /// Whether another broker holds a live (or committed) claim on a
    /// generation.
    async fn held_elsewhere(
        &self,
        id: &str,
        generation: u64,
        broker: &str,
    ) -> Result<bool, BrokerError> {
        let now = crate::clock::now_ms();
        Ok(match self.read_claim(&claim_path(id, generation)).await? {
            Some((b, _)) => b.broker != broker && !b.takeable_by(broker, now),
            None => false,
        })
    }

    /// Deletes everything under one generation (manifest first).
    pub async fn purge_generation(&self, id: &str, generation: u64) -> Result<(), BrokerError> {
        self.delete_under(&prefix(id, generation)).await
    }

    /// Deletes a bubble's frozen copies of generations up to `upto` (all a
    /// deleted bubble's record can have made), manifest first so that
    /// nothing half-deleted can be restored, except a generation another
    /// broker holds a live or committed claim on (it runs the bubble now).
    /// A claimant whose lease ran out finds its claim gone and cannot
    /// commit.
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
            if !self.held_elsewhere(id, g, broker).await? {
                self.purge_generation(id, g).await?;
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
        if let Some(root) = self.local_root.clone() {
            let base = base.to_owned();
            let _ = tokio::task::spawn_blocking(move || {
                super::cas::remove_empty_local_dirs(&root, &base)
            })
            .await;
        }
        Ok(())
    }
}

/// Where a generation's claim object is.
fn claim_path(id: &str, generation: u64) -> ObjPath {
    ObjPath::from(format!("{}/claim", prefix(id, generation)))
}

#[cfg(test)]
#[path = "claim_tests.rs"]
mod tests;
