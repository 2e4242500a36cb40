//! The audit log's pin in the registry: the last checkpoint the log's
//! writer made durable, so that a log cut back to an earlier point is
//! refused at start (`bubble_audit::AuditLog::open_pinned`).

use redb::{ReadableDatabase, TableDefinition};

use super::{Registry, RegistryError};

/// Small named values of the broker itself.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");

const AUDIT_PIN: &str = "audit_pin";

impl Registry {
    /// The pinned audit checkpoint: its sequence number and frame hash.
    pub fn audit_pin(&self) -> Result<Option<(u64, [u8; 32])>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = txn.open_table(META)?;
        let Some(v) = t.get(AUDIT_PIN)? else {
            return Ok(None);
        };
        let v = v.value();
        let corrupt = || RegistryError::Corrupt {
            id: AUDIT_PIN.into(),
            detail: format!("{} bytes, not 40", v.len()),
        };
        let (seq, hash) = v.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let hash: [u8; 32] = hash.try_into().map_err(|_| corrupt())?;
        Ok(Some((u64::from_le_bytes(*seq), hash)))
    }

    /// Pins an audit checkpoint (durable when it returns). A pin never
    /// moves back: an older checkpoint than the one pinned is ignored.
    pub fn set_audit_pin(&self, seq: u64, hash: &[u8; 32]) -> Result<(), RegistryError> {
        if self.audit_pin()?.is_some_and(|(s, _)| s > seq) {
            return Ok(());
        }
        let mut v = seq.to_le_bytes().to_vec();
        v.extend_from_slice(hash);
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(AUDIT_PIN, v.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }
}

impl Registry {
    /// Forgets the pin (a new log replaces a lost one: `--audit-new-log`).
    pub fn clear_audit_pin(&self) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(META)?.remove(AUDIT_PIN)?;
            txn.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_survives_a_reopen_and_never_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path).unwrap();
            assert_eq!(r.audit_pin().unwrap(), None);
            r.set_audit_pin(5, &[5; 32]).unwrap();
            r.set_audit_pin(3, &[3; 32]).unwrap();
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(r.audit_pin().unwrap(), Some((5, [5; 32])));
        r.set_audit_pin(9, &[9; 32]).unwrap();
        assert_eq!(r.audit_pin().unwrap(), Some((9, [9; 32])));
        r.clear_audit_pin().unwrap();
        assert_eq!(r.audit_pin().unwrap(), None);
        r.set_audit_pin(1, &[1; 32]).unwrap();
        assert_eq!(r.audit_pin().unwrap(), Some((1, [1; 32])));
    }
}
