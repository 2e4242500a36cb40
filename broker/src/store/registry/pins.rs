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

const AUDIT_STAGED: &str = "audit_staged";

impl Registry {
    /// The audit batch staged before its write (`bubble_audit::staged`).
    pub fn audit_staged(&self) -> Result<Option<bubble_audit::Staged>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = txn.open_table(META)?;
        let Some(v) = t.get(AUDIT_STAGED)? else {
            return Ok(None);
        };
        let v = v.value();
        bubble_audit::Staged::decode(v)
            .map(Some)
            .ok_or_else(|| RegistryError::Corrupt {
                id: AUDIT_STAGED.into(),
                detail: format!("{} bytes, fewer than 48", v.len()),
            })
    }

    /// In one commit: pins `durable` (never moving the pin back) and keeps
    /// `batch` as the staged audit batch (none: forgets it).
    pub fn stage_audit(
        &self,
        durable: Option<bubble_audit::Pin>,
        batch: Option<&bubble_audit::Staged>,
    ) -> Result<(), RegistryError> {
        let current = self.audit_pin()?;
        let pin = durable
            .filter(|d| current.is_none_or(|(s, _)| s <= d.seq))
            .map(|d| {
                let mut v = d.seq.to_le_bytes().to_vec();
                v.extend_from_slice(&d.hash);
                v
            });
        let staged = batch.map(|b| b.encode());
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(META)?;
                if let Some(pin) = &pin {
                    t.insert(AUDIT_PIN, pin.as_slice())?;
                }
                match &staged {
                    Some(b) => t.insert(AUDIT_STAGED, b.as_slice())?,
                    None => t.remove(AUDIT_STAGED)?,
                };
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Forgets the pin (a new log replaces a lost one: `--audit-new-log`).
    pub fn clear_audit_pin(&self) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(META)?;
                t.remove(AUDIT_PIN)?;
                t.remove(AUDIT_STAGED)?;
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

    /// The staged batch and the pin move in one commit; the pin still
    /// never moves back; no batch forgets it.
    #[test]
    fn a_staged_batch_round_trips_with_its_pin() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        let pin = |seq| bubble_audit::Pin {
            seq,
            hash: [seq as u8; 32],
        };
        let batch = bubble_audit::Staged {
            from_seq: 6,
            pin: pin(8),
            bytes: vec![1, 2, 3],
        };
        r.stage_audit(Some(pin(5)), Some(&batch)).unwrap();
        assert_eq!(r.audit_pin().unwrap(), Some((5, [5; 32])));
        assert_eq!(r.audit_staged().unwrap(), Some(batch.clone()));
        r.stage_audit(Some(pin(3)), None).unwrap();
        assert_eq!(r.audit_pin().unwrap(), Some((5, [5; 32])));
        assert_eq!(r.audit_staged().unwrap(), None);
        r.stage_audit(None, Some(&batch)).unwrap();
        r.clear_audit_pin().unwrap();
        assert_eq!(
            (r.audit_pin().unwrap(), r.audit_staged().unwrap()),
            (None, None)
        );
    }
}
