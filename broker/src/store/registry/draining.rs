//! Whether an operator drained the broker, kept across restarts: a
//! drained broker that is restarted (upgrade, crash) must not start
//! taking new bubbles again until an operator says so.

use redb::ReadableDatabase;

use super::pins::META;
use super::{Registry, RegistryError};

const DRAINING: &str = "draining";

impl Registry {
    /// Whether the broker was left draining.
    pub fn draining(&self) -> Result<bool, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = txn.open_table(META)?;
        let v = t.get(DRAINING)?;
        match v.as_ref().map(|v| v.value()) {
            None | Some([0]) => Ok(false),
            Some([1]) => Ok(true),
            Some(other) => Err(RegistryError::Corrupt {
                id: DRAINING.into(),
                detail: format!("{} bytes, not a flag", other.len()),
            }),
        }
    }

    /// Records draining (durable when it returns).
    pub fn set_draining(&self, on: bool) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(META)?
                .insert(DRAINING, [u8::from(on)].as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path).unwrap();
            assert!(!r.draining().unwrap());
            r.set_draining(true).unwrap();
        }
        let r = Registry::open(&path).unwrap();
        assert!(r.draining().unwrap());
        r.set_draining(false).unwrap();
        assert!(!r.draining().unwrap());
    }
}
