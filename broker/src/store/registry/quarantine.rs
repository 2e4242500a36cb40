//! Quarantined modules in the registry, so that a quarantine survives a
//! restart until an operator lifts it (see `core::strikes`).

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Registry, RegistryError};

/// `parent \0 module digest (hex)` → JSON [`Quarantine`].
pub(super) const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine_v1");

/// Why and since when a module is quarantined for one parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The reason given to the parent when a load is refused.
    pub reason: String,
    /// When it was quarantined, Unix ms.
    pub since_ms: u64,
}

fn key(parent: &str, digest: &str) -> String {
    format!("{parent}\0{digest}")
}

impl Registry {
    /// Records that `digest` is quarantined for `parent` (durable when it
    /// returns).
    pub fn put_quarantine(
        &self,
        parent: &str,
        digest: &str,
        q: &Quarantine,
    ) -> Result<(), RegistryError> {
        let value = serde_json::to_vec(q).map_err(|e| RegistryError::Db(e.to_string()))?;
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(QUARANTINE)?
                .insert(key(parent, digest).as_str(), value.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Removes the quarantine of `digest` for each of `parents`, in one
    /// transaction.
    pub fn remove_quarantine(&self, parents: &[String], digest: &str) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(QUARANTINE)?;
                for p in parents {
                    t.remove(key(p, digest).as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Every quarantine in force: (parent, digest, quarantine).
    pub fn quarantines(&self) -> Result<Vec<(String, String, Quarantine)>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let k = k.value();
            let corrupt = |detail: String| RegistryError::Corrupt {
                id: format!("quarantine {k:?}"),
                detail,
            };
            let (parent, digest) = k
                .split_once('\0')
                .ok_or_else(|| corrupt("key without a separator".into()))?;
            let q: Quarantine =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(e.to_string()))?;
            out.push((parent.to_string(), digest.to_string(), q));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantines_survive_a_reopen_and_lift_per_parent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let q = Quarantine {
            reason: "why".into(),
            since_ms: 7,
        };
        {
            let r = Registry::open(&path).unwrap();
            assert!(r.quarantines().unwrap().is_empty());
            r.put_quarantine("cert:a", "d1", &q).unwrap();
            r.put_quarantine("cert:b", "d1", &q).unwrap();
            r.put_quarantine("cert:a", "d2", &q).unwrap();
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(r.quarantines().unwrap().len(), 3);
        r.remove_quarantine(&["cert:a".into()], "d1").unwrap();
        let mut left: Vec<(String, String)> = r
            .quarantines()
            .unwrap()
            .into_iter()
            .map(|(p, d, got)| {
                assert_eq!(got, q);
                (p, d)
            })
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ("cert:a".to_string(), "d2".to_string()),
                ("cert:b".to_string(), "d1".to_string())
            ]
        );
    }
}
