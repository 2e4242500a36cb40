//! Results of awaits resumed on another broker, relayed through the
//! shared store: `await-results/<await id>` holds the encoded outcome,
//! encrypted and authenticated with AES-256-GCM under a key derived from
//! the await index key (so from the key-encryption key the brokers
//! share), the await id as associated data: the store sees ciphertext,
//! and an object moved to another id or altered does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};

use super::{store_err, FrozenStore};
use crate::error::BrokerError;

/// Largest relayed result read (an outcome holds at most a call's output).
const MAX_RESULT_LEN: usize = 2 << 20;
const NONCE_LEN: usize = 12;

fn result_path(id: &str) -> ObjPath {
    ObjPath::from(format!("await-results/{id}"))
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

    /// Stores the encoded outcome of await `id` (replacing one).
    pub async fn put_await_result(&self, id: &str, outcome: &[u8]) -> Result<(), BrokerError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| BrokerError::Store(e.to_string()))?;
        let ct = self
            .result_cipher()?
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: outcome,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| BrokerError::Store("encrypting a relayed result failed".into()))?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&ct);
        self.store
            .put(&result_path(id), PutPayload::from(body))
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// The encoded outcome relayed for await `id`, if there is one that
    /// opens (anything else counts as none).
    pub async fn get_await_result(&self, id: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let body = match self.store.get(&result_path(id)).await {
            Ok(r) => r.bytes().await.map_err(store_err)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(e)),
        };
        if body.len() > MAX_RESULT_LEN || body.len() < NONCE_LEN + 16 {
            return Ok(None);
        }
        let (nonce, ct) = body.split_at(NONCE_LEN);
        Ok(self
            .result_cipher()?
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: id.as_bytes(),
                },
            )
            .ok())
    }

    /// Removes the relayed result of await `id`, if any.
    pub async fn delete_await_result(&self, id: &str) -> Result<(), BrokerError> {
        match self.store.delete(&result_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relayed_results_open_only_under_their_id_and_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let s = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        s.set_index_key(zeroize::Zeroizing::new([7; 32]));
        assert_eq!(s.get_await_result("a1").await.ok().flatten(), None);
        s.put_await_result("a1", b"outcome-bytes")
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            s.get_await_result("a1").await.ok().flatten().as_deref(),
            Some(&b"outcome-bytes"[..])
        );
        // Ciphertext at rest.
        let raw = std::fs::read(dir.path().join("await-results/a1")).unwrap_or_default();
        assert!(!raw.windows(7).any(|w| w == b"outcome"));
        // Moved to another id: does not open.
        std::fs::copy(
            dir.path().join("await-results/a1"),
            dir.path().join("await-results/a2"),
        )
        .unwrap_or_default();
        assert_eq!(s.get_await_result("a2").await.ok().flatten(), None);
        // Another key: does not open.
        let other = FrozenStore::local(dir.path()).unwrap_or_else(|_| unreachable!());
        other.set_index_key(zeroize::Zeroizing::new([8; 32]));
        assert_eq!(other.get_await_result("a1").await.ok().flatten(), None);
        s.delete_await_result("a1")
            .await
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(s.get_await_result("a1").await.ok().flatten(), None);
    }
}
