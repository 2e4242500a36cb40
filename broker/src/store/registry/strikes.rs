//! Strike windows and throttles in the registry, so that a restarted
//! broker keeps counting (see `core::strikes`): a hostile parent or module
//! cannot reset its count by waiting for, or causing, a restart. They are
//! written only when a strike is counted (rare), never on the call path.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Registry, RegistryError};

/// Key (made and parsed by `core::strikes`) → JSON [`StrikeEntry`].
pub(super) const STRIKES: TableDefinition<&str, &[u8]> = TableDefinition::new("strikes_v1");

/// One persisted piece of the strike ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrikeEntry {
    /// The times (Unix ms, oldest first) of the recent strikes of a window.
    Window(Vec<u64>),
    /// A parent is throttled until this time (Unix ms).
    ThrottledUntil(u64),
}

impl Registry {
    /// Every persisted strike entry: (key, entry).
    pub fn strike_entries(&self) -> Result<Vec<(String, StrikeEntry)>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = txn.open_table(STRIKES)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let k = k.value().to_string();
            let e = serde_json::from_slice(v.value()).map_err(|e| RegistryError::Corrupt {
                id: format!("strike entry {k:?}"),
                detail: e.to_string(),
            })?;
            out.push((k, e));
        }
        Ok(out)
    }

    /// Writes `puts` and removes `dels`, in one durable transaction.
    pub fn update_strikes(
        &self,
        puts: &[(String, StrikeEntry)],
        dels: &[String],
    ) -> Result<(), RegistryError> {
        if puts.is_empty() && dels.is_empty() {
            return Ok(());
        }
        let values = puts
            .iter()
            .map(|(k, e)| Ok((k.as_str(), serde_json::to_vec(e)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| RegistryError::Db(e.to_string()))?;
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(STRIKES)?;
                for k in dels {
                    t.remove(k.as_str())?;
                }
                for (k, v) in &values {
                    t.insert(*k, v.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strike_entries_survive_a_reopen_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path).unwrap();
            assert!(r.strike_entries().unwrap().is_empty());
            r.update_strikes(
                &[
                    ("a".into(), StrikeEntry::Window(vec![1, 2])),
                    ("b".into(), StrikeEntry::ThrottledUntil(9)),
                ],
                &[],
            )
            .unwrap();
        }
        let r = Registry::open(&path).unwrap();
        let mut got = r.strike_entries().unwrap();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            vec![
                ("a".to_string(), StrikeEntry::Window(vec![1, 2])),
                ("b".to_string(), StrikeEntry::ThrottledUntil(9)),
            ]
        );
        r.update_strikes(&[], &["a".into()]).unwrap();
        assert_eq!(r.strike_entries().unwrap().len(), 1);
    }
}
