//! The await index in the shared store: `awaits/<await id>` holds the
//! JSON [`AwaitRecord`] of a frozen, awaiting bubble, so that any broker
//! sharing the store finds it when the event arrives there (or when its
//! deadline passes). Created only if absent (a conditional write: one
//! await per key and owner across every broker), deleted when the await
//! ends.
//!
//! The store is untrusted, and an index entry decides what a broker does
//! (restore a bubble, resume it, publish its result under a key, delete a
//! pool bubble). Each object is therefore `HMAC-SHA256(k, json) || json`,
//! with `k` derived from the broker key-encryption key that every broker
//! sharing the store holds (`Kek::derive(INDEX_KEY_LABEL)`); an object
//! that does not verify is treated as absent (and cannot be overwritten
//! by [`FrozenStore::put_await`] unless it is absent or ended). Someone
//! who can write to the store but lacks that key can delete entries
//! (awaits then end by their deadline only if a broker still has them in
//! its registry) but not forge or alter one. Brokers that do not share
//! the key cannot read each other's awaits.

use std::collections::HashMap;

use object_store::path::Path as ObjPath;

use super::cas::CasError;
use super::{store_err, FrozenStore};
use crate::error::BrokerError;
use crate::store::registry::awaits::{AwaitPhase, AwaitRecord};

/// Largest index object read (a record is a few hundred bytes).
const MAX_INDEX_LEN: usize = 8 << 10;

/// What the index key is derived for (`Kek::derive`).
pub const INDEX_KEY_LABEL: &[u8] = b"await index v1";

type Mac = hmac::Hmac<sha2::Sha256>;

impl FrozenStore {
    /// Sets the key the await index is authenticated with (once).
    pub fn set_index_key(&self, key: zeroize::Zeroizing<[u8; 32]>) {
        let _ = self.index_key.set(key);
    }

    fn index_mac(&self) -> Result<Mac, BrokerError> {
        use hmac::Mac as _;
        let key = self
            .index_key
            .get()
            .ok_or_else(|| BrokerError::Store("the await index has no key".into()))?;
        Mac::new_from_slice(&key[..]).map_err(|e| BrokerError::Store(e.to_string()))
    }

    /// `mac || json` of `a`.
    fn seal_index(&self, a: &AwaitRecord) -> Result<Vec<u8>, BrokerError> {
        use hmac::Mac as _;
        let json = serde_json::to_vec(a).map_err(|e| BrokerError::Store(e.to_string()))?;
        let mut m = self.index_mac()?;
        m.update(&json);
        let mut out = m.finalize().into_bytes().to_vec();
        out.extend_from_slice(&json);
        Ok(out)
    }

    /// The record an index object holds, if it is one this store's
    /// brokers wrote (size bounded, MAC verified in constant time).
    fn open_index(&self, b: &[u8]) -> Option<AwaitRecord> {
        use hmac::Mac as _;
        if b.len() > MAX_INDEX_LEN || b.len() < 32 {
            return None;
        }
        let (tag, json) = b.split_at(32);
        let mut m = self.index_mac().ok()?;
        m.update(json);
        m.verify_slice(tag).ok()?;
        serde_json::from_slice(json).ok()
    }
}

/// What a sweeper has read of the index: per object id, the version it
/// read and the record it held (none: not a valid entry).
#[derive(Default)]
pub struct IndexCache {
    seen: HashMap<String, (String, Option<AwaitRecord>)>,
}

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
        let body = self.seal_index(a)?;
        let path = index_path(&a.id);
        let mut replaced = None;
        let expect = match self.cas_read(&path).await? {
            None => None,
            Some((b, v)) => match self.open_index(&b) {
                Some(now) if now.phase != AwaitPhase::Ended => return Err(IndexError::Taken),
                now => {
                    replaced = now;
                    Some(v)
                }
            },
        };
        match self.cas_write(&path, expect.as_ref(), body).await {
            Ok(_) => {
                // The ended await this one replaces: its kept result goes
                // (nobody can name that instance any more).
                if let Some(old) = replaced {
                    let _ = self.delete_await_result(&old).await;
                }
                Ok(())
            }
            Err(CasError::Conflict) => Err(IndexError::Taken),
            Err(CasError::Store(e)) => Err(IndexError::Store(e)),
        }
    }

    /// Replaces the index of `a` (same id, bubble and generation, not
    /// ended) with `a`; false if the index is not that await any more.
    pub async fn update_await(&self, a: &AwaitRecord) -> Result<bool, BrokerError> {
        let body = self.seal_index(a)?;
        let path = index_path(&a.id);
        let Some((b, v)) = self.cas_read(&path).await? else {
            return Ok(false);
        };
        match self.open_index(&b) {
            Some(now)
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
        Ok(self.open_index(&b).filter(|a| a.id == id))
    }

    /// Removes the index entry of `a` only if it is exactly `a` (every
    /// field: the same await instance, still ENDED at the same time) and
    /// `a` is ENDED; true if it was removed. The version read is the one
    /// deleted ([`FrozenStore::cas_delete`]), so an entry that a new await
    /// on the key (or a late phase change) replaced is left alone.
    pub async fn delete_await(&self, a: &AwaitRecord) -> Result<bool, BrokerError> {
        if a.phase != AwaitPhase::Ended {
            return Ok(false);
        }
        let path = index_path(&a.id);
        let Some((b, v)) = self.cas_read(&path).await? else {
            return Ok(false);
        };
        if self.open_index(&b).as_ref() != Some(a) {
            return Ok(false);
        }
        self.cas_delete(&path, &v).await
    }

    /// The index as it is now, reading only the objects that are new or
    /// changed (by the listing's version: e-tag, else time and size)
    /// since `cache` last saw them: one listing, and reads for what
    /// changed. Returns the records and how many objects were read.
    pub async fn scan_awaits(
        &self,
        cache: &mut IndexCache,
    ) -> Result<(Vec<AwaitRecord>, usize), BrokerError> {
        use futures::TryStreamExt;
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&ObjPath::from("awaits")))
            .try_collect()
            .await
            .map_err(store_err)?;
        let mut reads = 0;
        let mut next = HashMap::with_capacity(metas.len());
        for m in metas {
            let id = m.location.filename().unwrap_or_default().to_string();
            let version = m.e_tag.clone().unwrap_or_else(|| {
                format!(
                    "{}:{}",
                    m.last_modified.timestamp_nanos_opt().unwrap_or_default(),
                    m.size
                )
            });
            let entry = match cache.seen.remove(&id) {
                Some((v, rec)) if v == version => (v, rec),
                _ => {
                    reads += 1;
                    match self.get_await(&id).await {
                        Ok(r) => (version, r),
                        // One unreadable entry does not stop the sweep of
                        // the others; it is read again next time.
                        Err(e) => {
                            tracing::warn!(await_id = %id, error = %e, "reading an await index entry failed; skipped");
                            (String::new(), None)
                        }
                    }
                }
            };
            next.insert(id, entry);
        }
        cache.seen = next;
        let out = cache.seen.values().filter_map(|(_, r)| r.clone()).collect();
        Ok((out, reads))
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
            match self.get_await(&id).await {
                Ok(Some(a)) => out.push(a),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(await_id = %id, error = %e, "reading an await index entry failed; skipped")
                }
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
            ended_at_ms: 0,
        }
    }

    fn ended_(mut a: AwaitRecord) -> AwaitRecord {
        a.phase = AwaitPhase::Ended;
        a.ended_at_ms = 50;
        a
    }

    /// The retention sweep deletes only the ended instance it read: not
    /// a newer await indexed since at the same bubble and generation (a
    /// failed freeze ends at g+1 while the bubble stays at g, so the next
    /// await is indexed at g+1 again), and not the newer await's result.
    #[tokio::test]
    async fn retention_deletes_only_the_ended_instance_read() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        let mut old = rec("a1", 3);
        old.created_at_ms = 10;
        s.put_await(&old).await.unwrap_or_else(|_| unreachable!());
        let old = ended_(old);
        assert!(s.update_await(&old).await.unwrap_or(false));
        assert!(s.put_await_result(&old, b"old").await.unwrap_or(false));
        // What the sweeper read: `old`, ENDED. A new await on the key
        // (same bubble, same generation) is indexed before it deletes.
        let mut new = rec("a1", 3);
        new.created_at_ms = 20;
        s.put_await(&new).await.unwrap_or_else(|_| unreachable!());
        // The replaced instance's result went with it.
        assert_eq!(s.get_await_result(&old).await.ok().flatten(), None);
        assert!(!s.delete_await(&old).await.unwrap_or(true));
        assert_eq!(s.get_await("a1").await.ok().flatten(), Some(new.clone()));
        // The new await ends with a kept answer; a stale ENDED copy of it
        // (ended at another time) deletes nothing either.
        let new = ended_(new);
        assert!(s.update_await(&new).await.unwrap_or(false));
        assert!(s.put_await_result(&new, b"new").await.unwrap_or(false));
        let mut stale = new.clone();
        stale.ended_at_ms = 49;
        assert!(!s.delete_await(&stale).await.unwrap_or(true));
        assert_eq!(
            s.get_await_result(&new).await.ok().flatten().as_deref(),
            Some(&b"new"[..])
        );
        assert!(s.delete_await(&new).await.unwrap_or(false));
        assert!(!s.delete_await(&new).await.unwrap_or(true));
    }

    #[tokio::test]
    async fn one_index_per_id_and_stale_deletes_do_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        assert!(s
            .get_await("a1")
            .await
            .unwrap_or_else(|_| unreachable!())
            .is_none());
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
        // A delete for another generation, or of a live await, leaves it.
        assert!(!s.delete_await(&ended_(rec("a1", 1))).await.unwrap_or(true));
        assert!(!s.delete_await(&rec("a1", 2)).await.unwrap_or(true));
        assert!(s.get_await("a1").await.ok().flatten().is_some());
        // Phases move by conditional replaces; an ended await frees the key.
        let mut ended = rec("a1", 2);
        ended.phase = AwaitPhase::Ended;
        assert!(!s.update_await(&rec("a1", 7)).await.unwrap_or(true));
        assert!(s.update_await(&ended).await.unwrap_or(false));
        assert!(!s.update_await(&ended).await.unwrap_or(true));
        assert!(s.put_await(&rec("a1", 4)).await.is_ok());
        let four = ended_(rec("a1", 4));
        assert!(s.update_await(&four).await.unwrap_or(false));
        assert!(s.delete_await(&four).await.unwrap_or(false));
        assert!(s.get_await("a1").await.ok().flatten().is_none());
        // Garbage in the store names nothing.
        std::fs::create_dir_all(dir.path().join("awaits")).unwrap_or_default();
        std::fs::write(dir.path().join("awaits/a2"), b"{not json").unwrap_or_default();
        assert!(s
            .get_await("a2")
            .await
            .unwrap_or_else(|_| unreachable!())
            .is_none());
        assert!(s
            .list_awaits()
            .await
            .unwrap_or_else(|_| unreachable!())
            .is_empty());
    }

    /// The sweeper's scan reads only new or changed entries.
    #[tokio::test]
    async fn a_scan_reads_only_what_changed() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        for i in 0..5 {
            s.put_await(&rec(&format!("a{i}"), 1))
                .await
                .unwrap_or_else(|_| unreachable!());
        }
        let mut cache = IndexCache::default();
        async fn scan(s: &FrozenStore, c: &mut IndexCache) -> (Vec<AwaitRecord>, usize) {
            let (mut v, n) = s.scan_awaits(c).await.unwrap_or_else(|_| unreachable!());
            v.sort_by(|a, b| a.id.cmp(&b.id));
            (v, n)
        }
        let (v, n) = scan(&s, &mut cache).await;
        assert_eq!((v.len(), n), (5, 5));
        let (v, n) = scan(&s, &mut cache).await;
        assert_eq!((v.len(), n), (5, 0), "nothing changed: nothing read");
        let mut ended = rec("a3", 1);
        ended.phase = AwaitPhase::Ended;
        assert!(s.update_await(&ended).await.unwrap_or(false));
        let a0 = ended_(rec("a0", 1));
        assert!(s.update_await(&a0).await.unwrap_or(false));
        assert!(s.delete_await(&a0).await.unwrap_or(false));
        let (v, n) = scan(&s, &mut cache).await;
        assert_eq!(n, 1, "only the changed entry is read (a0 went)");
        assert_eq!(v.len(), 4);
        assert_eq!(v[2].phase, AwaitPhase::Ended);
    }

    /// One entry that cannot be read (here a directory where the entry's
    /// object would be) does not fail the scan or listing of the others.
    #[tokio::test]
    async fn an_unreadable_entry_is_skipped() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        s.put_await(&rec("a1", 1))
            .await
            .unwrap_or_else(|_| unreachable!());
        // Listed as awaits/y/y, read as awaits/y: a directory.
        std::fs::create_dir_all(dir.path().join("awaits/y")).unwrap_or_default();
        std::fs::write(dir.path().join("awaits/y/y"), b"x").unwrap_or_default();
        assert!(s.get_await("y").await.is_err());
        let mut cache = IndexCache::default();
        let (v, _) = s
            .scan_awaits(&mut cache)
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(v, vec![rec("a1", 1)]);
        let (_, reads) = s
            .scan_awaits(&mut cache)
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(reads, 1, "the unreadable entry is read again");
        assert_eq!(s.list_awaits().await.ok(), Some(vec![rec("a1", 1)]));
    }

    /// Someone who can write to the store but lacks the key cannot forge
    /// an entry, alter one, or read entries as another key's broker.
    #[tokio::test]
    async fn forged_or_altered_entries_name_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        let read = |id: &'static str| {
            let s = &s;
            async move { s.get_await(id).await.unwrap_or_else(|_| unreachable!()) }
        };
        // A well-formed record without the MAC, and one with a MAC under
        // another key.
        let forged = serde_json::to_vec(&rec("f1", 1)).unwrap_or_default();
        std::fs::create_dir_all(dir.path().join("awaits")).unwrap_or_default();
        std::fs::write(dir.path().join("awaits/f1"), &forged).unwrap_or_default();
        assert_eq!(read("f1").await, None);
        let other = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        other.set_index_key(zeroize::Zeroizing::new([8; 32]));
        other
            .put_await(&rec("f2", 1))
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(read("f2").await, None);
        // A genuine entry with one byte changed.
        s.put_await(&rec("g1", 1))
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(read("g1").await, Some(rec("g1", 1)));
        let path = dir.path().join("awaits/g1");
        let mut b = std::fs::read(&path).unwrap_or_default();
        let last = b.len() - 3;
        b[last] ^= 1;
        std::fs::write(&path, &b).unwrap_or_default();
        assert_eq!(read("g1").await, None);
        // Without a key the index is neither written nor believed.
        let keyless = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        assert!(keyless.put_await(&rec("k1", 1)).await.is_err());
    }
}
