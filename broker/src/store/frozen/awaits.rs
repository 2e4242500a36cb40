//! The await index in the shared store: `awaits/<await id>` holds the
//! JSON [`AwaitRecord`] of a frozen, awaiting bubble, so that any broker
//! sharing the store finds it when the event arrives there (or when its
//! deadline passes). Created only if absent (a conditional write: one
//! await per key and owner across every broker), deleted when the await
//! ends.
//!
//! The store is untrusted: an index object only tells a broker which
//! frozen copy to try. The copy itself is authenticated (its sealed
//! header names owner and generation), and a record whose owner differs
//! from the event's is ignored, so a forged index can at most make a
//! broker try a restore that fails.

use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;

use super::cas::CasError;
use super::{store_err, FrozenStore};
use crate::error::BrokerError;
use crate::store::registry::awaits::{AwaitPhase, AwaitRecord};

/// Largest index object read (a record is a few hundred bytes).
const MAX_INDEX_LEN: usize = 8 << 10;

fn index_path(id: &str) -> ObjPath {
    ObjPath::from(format!("awaits/{id}"))
}

/// Why an await could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Another await (this owner, this key) is indexed already.
    #[error("an await on this key exists already")]
    Taken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] BrokerError),
}

impl FrozenStore {
    /// Indexes `a`, only if no await with its id is indexed or the one
    /// indexed has ended (conditional writes: concurrent brokers cannot
    /// both take a key).
    pub async fn put_await(&self, a: &AwaitRecord) -> Result<(), IndexError> {
        let body = serde_json::to_vec(a).map_err(|e| BrokerError::Store(e.to_string()))?;
        let path = index_path(&a.id);
        let expect = match self.cas_read(&path).await? {
            None => None,
            Some((b, v)) => match serde_json::from_slice::<AwaitRecord>(&b) {
                Ok(now) if now.phase != AwaitPhase::Ended => return Err(IndexError::Taken),
                _ => Some(v),
            },
        };
        match self.cas_write(&path, expect.as_ref(), body).await {
            Ok(_) => Ok(()),
            Err(CasError::Conflict) => Err(IndexError::Taken),
            Err(CasError::Store(e)) => Err(IndexError::Store(e)),
        }
    }

    /// Replaces the index of `a` (same id, bubble and generation, not
    /// ended) with `a`; false if the index is not that await any more.
    pub async fn update_await(&self, a: &AwaitRecord) -> Result<bool, BrokerError> {
        let body = serde_json::to_vec(a).map_err(|e| BrokerError::Store(e.to_string()))?;
        let path = index_path(&a.id);
        let Some((b, v)) = self.cas_read(&path).await? else {
            return Ok(false);
        };
        match serde_json::from_slice::<AwaitRecord>(&b) {
            Ok(now)
                if now.bubble_id == a.bubble_id
                    && now.generation == a.generation
                    && now.phase != AwaitPhase::Ended => {}
            _ => return Ok(false),
        }
        match self.cas_write(&path, Some(&v), body).await {
            Ok(_) => Ok(true),
            Err(CasError::Conflict) => Ok(false),
            Err(CasError::Store(e)) => Err(e),
        }
    }

    /// The indexed await `id`, if any (an unreadable object counts as
    /// none: it names nothing a restore could use).
    pub async fn get_await(&self, id: &str) -> Result<Option<AwaitRecord>, BrokerError> {
        let Some((b, _)) = self.cas_read(&index_path(id)).await? else {
            return Ok(None);
        };
        if b.len() > MAX_INDEX_LEN {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<AwaitRecord>(&b)
            .ok()
            .filter(|a| a.id == id))
    }

    /// Removes the index of `a` if it still names the same bubble and
    /// generation.
    pub async fn delete_await(&self, a: &AwaitRecord) -> Result<(), BrokerError> {
        match self.get_await(&a.id).await? {
            Some(now) if now.bubble_id == a.bubble_id && now.generation == a.generation => {}
            _ => return Ok(()),
        }
        match self.store.delete(&index_path(&a.id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Every indexed await (for the deadline sweeper).
    pub async fn list_awaits(&self) -> Result<Vec<AwaitRecord>, BrokerError> {
        use futures::TryStreamExt;
        let ids: Vec<String> = self
            .store
            .list(Some(&ObjPath::from("awaits")))
            .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .map_err(store_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(a) = self.get_await(&id).await? {
                out.push(a);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase, AwaitRecord};

    fn rec(id: &str, generation: u64) -> AwaitRecord {
        AwaitRecord {
            id: id.into(),
            owner: "uid:1".into(),
            key: "k".into(),
            bubble_id: "b-1".into(),
            generation,
            deadline_ms: 5,
            signed: false,
            origin: AwaitOrigin::Call,
            broker: "x".into(),
            created_at_ms: 0,
            phase: AwaitPhase::Frozen,
        }
    }

    #[tokio::test]
    async fn one_index_per_id_and_stale_deletes_do_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        assert!(s.get_await("a1").await.unwrap_or_default().is_none());
        s.put_await(&rec("a1", 2))
            .await
            .unwrap_or_else(|_| unreachable!());
        // Concurrent second awaits on the same id: all refused.
        let other = rec("a1", 9);
        let second = futures::future::join_all((0..8).map(|_| s.put_await(&other))).await;
        assert!(second.iter().all(|r| matches!(r, Err(IndexError::Taken))));
        assert_eq!(s.get_await("a1").await.ok().flatten(), Some(rec("a1", 2)));
        assert_eq!(
            s.list_awaits().await.unwrap_or_default(),
            vec![rec("a1", 2)]
        );
        // A delete for another generation leaves it.
        s.delete_await(&rec("a1", 1))
            .await
            .unwrap_or_else(|_| unreachable!());
        assert!(s.get_await("a1").await.ok().flatten().is_some());
        // Phases move by conditional replaces; an ended await frees the key.
        let mut ended = rec("a1", 2);
        ended.phase = AwaitPhase::Ended;
        assert!(!s.update_await(&rec("a1", 7)).await.unwrap_or(true));
        assert!(s.update_await(&ended).await.unwrap_or(false));
        assert!(!s.update_await(&ended).await.unwrap_or(true));
        assert!(s.put_await(&rec("a1", 4)).await.is_ok());
        s.delete_await(&rec("a1", 4))
            .await
            .unwrap_or_else(|_| unreachable!());
        assert!(s.get_await("a1").await.ok().flatten().is_none());
        // Garbage in the store names nothing.
        std::fs::create_dir_all(dir.path().join("awaits")).unwrap_or_default();
        std::fs::write(dir.path().join("awaits/a2"), b"{not json").unwrap_or_default();
        assert!(s.get_await("a2").await.ok().flatten().is_none());
        assert!(s.list_awaits().await.unwrap_or_default().is_empty());
    }
}
