//! Kept and relayed results of awaits, through the shared store:
//! `await-results/<await id>/<generation>-<created at>` holds the encoded
//! outcome of one await instance, encrypted and authenticated with
//! AES-256-GCM under a key derived from the await index key (so from the
//! key-encryption key the brokers share). The associated data names the
//! instance (id, owner, key, generation, created at), and a reader opens
//! the object of the instance the (authenticated) index names, so an
//! object moved to another await, or an older answer of an earlier await
//! on the same key put back, does not open. Each object is written once
//! (create-only): a late second writer cannot replace the kept answer.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;

use super::cas::CasError;
use super::{store_err, FrozenStore};
use crate::error::BrokerError;
use crate::store::registry::awaits::AwaitRecord;

/// Largest relayed result read (an outcome holds at most a call's output).
const MAX_RESULT_LEN: u64 = 2 << 20;
const NONCE_LEN: usize = 12;

fn result_path(a: &AwaitRecord) -> ObjPath {
    ObjPath::from(format!(
        "await-results/{}/{}-{}",
        a.id, a.generation, a.created_at_ms
    ))
}

/// The associated data of `a`'s result: its instance, each field length
/// prefixed.
fn aad(a: &AwaitRecord) -> Vec<u8> {
    let mut out = b"await result v2".to_vec();
    for f in [a.id.as_bytes(), a.owner.as_bytes(), a.key.as_bytes()] {
        out.extend_from_slice(&(f.len() as u64).to_le_bytes());
        out.extend_from_slice(f);
    }
    out.extend_from_slice(&a.generation.to_le_bytes());
    out.extend_from_slice(&a.created_at_ms.to_le_bytes());
    out
}

impl FrozenStore {
    fn result_cipher(&self) -> Result<Aes256Gcm, BrokerError> {
        use hmac::Mac;
        let key = self
            .index_key
            .get()
            .ok_or_else(|| BrokerError::Store("the await index has no key".into()))?;
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key[..])
            .map_err(|e| BrokerError::Store(e.to_string()))?;
        m.update(b"await results v1");
        let k = zeroize::Zeroizing::new(m.finalize().into_bytes());
        Aes256Gcm::new_from_slice(&k).map_err(|e| BrokerError::Store(e.to_string()))
    }

    /// Stores the encoded outcome of await instance `a`, only if none is
    /// stored for it yet; false if one was (the first answer stays).
    pub async fn put_await_result(
        &self,
        a: &AwaitRecord,
        outcome: &[u8],
    ) -> Result<bool, BrokerError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| BrokerError::Store(e.to_string()))?;
        let ct = self
            .result_cipher()?
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: outcome,
                    aad: &aad(a),
                },
            )
            .map_err(|_| BrokerError::Store("encrypting a relayed result failed".into()))?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&ct);
        match self.cas_write(&result_path(a), None, body).await {
            Ok(_) => Ok(true),
            Err(CasError::Conflict) => Ok(false),
            Err(CasError::Store(e)) => Err(e),
        }
    }

    /// The encoded outcome kept for await instance `a`, if there is one
    /// that opens (anything else counts as none). The size is checked
    /// before the body is read.
    pub async fn get_await_result(&self, a: &AwaitRecord) -> Result<Option<Vec<u8>>, BrokerError> {
        let path = result_path(a);
        match self.store.head(&path).await {
            Ok(m) if m.size > MAX_RESULT_LEN || m.size < (NONCE_LEN + 16) as u64 => {
                return Ok(None)
            }
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(e)),
        }
        let body = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(store_err)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(e)),
        };
        // Replaced between the two reads by something larger.
        if body.len() as u64 > MAX_RESULT_LEN || body.len() < NONCE_LEN + 16 {
            return Ok(None);
        }
        let (nonce, ct) = body.split_at(NONCE_LEN);
        Ok(self
            .result_cipher()?
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: &aad(a),
                },
            )
            .ok())
    }

    /// Removes the kept result of await instance `a`, if any.
    pub async fn delete_await_result(&self, a: &AwaitRecord) -> Result<(), BrokerError> {
        match self.store.delete(&result_path(a)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::awaits::{AwaitOrigin, AwaitPhase};

    fn rec(key: &str, generation: u64, created_at_ms: u64) -> AwaitRecord {
        AwaitRecord {
            id: format!("id-{key}"),
            owner: "uid:1".into(),
            key: key.into(),
            bubble_id: "b-1".into(),
            generation,
            deadline_ms: 5,
            signed: false,
            origin: AwaitOrigin::Call,
            broker: "x".into(),
            created_at_ms,
            phase: AwaitPhase::Ended,
            ended_at_ms: 9,
        }
    }

    fn file(dir: &std::path::Path, a: &AwaitRecord) -> std::path::PathBuf {
        dir.join(result_path(a).as_ref())
    }

    #[tokio::test]
    async fn results_open_only_for_their_instance_and_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        let a1 = rec("k", 2, 100);
        assert_eq!(s.get_await_result(&a1).await.ok().flatten(), None);
        assert!(s
            .put_await_result(&a1, b"outcome-bytes")
            .await
            .unwrap_or(false));
        assert_eq!(
            s.get_await_result(&a1).await.ok().flatten().as_deref(),
            Some(&b"outcome-bytes"[..])
        );
        // Ciphertext at rest.
        let raw = std::fs::read(file(dir.path(), &a1)).unwrap_or_default();
        assert!(!raw.windows(7).any(|w| w == b"outcome"));
        // Create-only: a second (late, stale) writer does not replace it.
        assert!(!s
            .put_await_result(&a1, b"late-failure")
            .await
            .unwrap_or(true));
        assert_eq!(
            s.get_await_result(&a1).await.ok().flatten().as_deref(),
            Some(&b"outcome-bytes"[..])
        );
        // An older answer of an earlier await on the same key (same id),
        // put where the later instance's answer goes: does not open, for
        // another generation nor for another creation time.
        for later in [rec("k", 3, 100), rec("k", 2, 101)] {
            let to = file(dir.path(), &later);
            std::fs::create_dir_all(to.parent().unwrap_or_else(|| unreachable!()))
                .unwrap_or_default();
            std::fs::copy(file(dir.path(), &a1), &to).unwrap_or_default();
            assert_eq!(s.get_await_result(&later).await.ok().flatten(), None);
        }
        // Another owner or key under the same id and instance: does not open.
        let mut other_owner = a1.clone();
        other_owner.owner = "uid:2".into();
        let mut other_key = a1.clone();
        other_key.key = "k2".into();
        for o in [other_owner, other_key] {
            assert_eq!(s.get_await_result(&o).await.ok().flatten(), None);
        }
        // Another key: does not open.
        let other = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        other.set_index_key(zeroize::Zeroizing::new([8; 32]));
        assert_eq!(other.get_await_result(&a1).await.ok().flatten(), None);
        // Oversized: not read.
        let big = rec("big", 1, 1);
        let to = file(dir.path(), &big);
        std::fs::create_dir_all(to.parent().unwrap_or_else(|| unreachable!())).unwrap_or_default();
        std::fs::write(&to, vec![0u8; (MAX_RESULT_LEN + 1) as usize]).unwrap_or_default();
        assert_eq!(s.get_await_result(&big).await.ok().flatten(), None);
        s.delete_await_result(&a1)
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(s.get_await_result(&a1).await.ok().flatten(), None);
    }
}
