//! Triggers in the registry: one JSON record per trigger, in the same
//! redb database as the bubbles, each change a durable commit before it
//! is acted on (a restarted broker restarts every trigger's dispatcher).

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::{PortionPolicy, Registry, RegistryError};

/// Trigger records keyed by trigger id.
const TRIGGERS: TableDefinition<&str, &[u8]> = TableDefinition::new("triggers_v1");

/// Where a trigger's events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerSource {
    /// The broker's embedded queue.
    Embedded,
    /// NATS JetStream.
    Nats,
}

impl TriggerSource {
    /// Its name in the API.
    pub fn label(self) -> &'static str {
        match self {
            TriggerSource::Embedded => "embedded",
            TriggerSource::Nats => "nats",
        }
    }
}

/// Which bubble runs a trigger's events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerTarget {
    /// One of the owner's bubbles, by id, with the portion loaded.
    Bubble(String),
    /// A bubble attached from this warm-pool profile, with `module`
    /// loaded as the trigger's portion.
    Pool {
        /// The profile.
        profile: String,
        /// The WebAssembly module.
        module: Vec<u8>,
        /// Its SHA-384, hex.
        module_sha384: String,
    },
}

/// One trigger as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRecord {
    /// `t-` + 32 hex digits.
    pub id: String,
    /// The parent that owns it.
    pub owner: String,
    /// Its source.
    pub source: TriggerSource,
    /// The subject, as the owner named it (the queue's subject is
    /// namespaced by owner: see `core::triggers`).
    pub subject: String,
    /// What runs its events.
    pub target: TriggerTarget,
    /// Portion name.
    pub portion: String,
    /// Function of the portion.
    pub function: String,
    /// Events fetched at once.
    pub batch_size: u32,
    /// Events in flight at once.
    pub max_concurrency: u32,
    /// Deliveries before an event is dead-lettered.
    pub max_deliver: u32,
    /// Creation time, Unix ms.
    pub created_at_ms: u64,
    /// The security policy its events run under: a pool trigger's
    /// bubbles are attached with it (`None`: the default policy); on a
    /// named bubble it equals the bubble's (`None`: not given).
    #[serde(default)]
    pub policy: Option<PortionPolicy>,
    /// Most events pending at once on the embedded queue (0: a trigger
    /// stored before limits; the broker's `[events] max_pending` then).
    #[serde(default)]
    pub max_pending: u64,
    /// Results are sealed to this X25519 public key inside the bubble.
    #[serde(default)]
    pub seal_to: Option<[u8; 32]>,
}

impl Registry {
    /// Stores a new trigger (durably).
    pub fn put_trigger(&self, t: &TriggerRecord) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(t).map_err(|e| RegistryError::corrupt(&t.id, e))?;
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(TRIGGERS)?
                .insert(t.id.as_str(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Removes a trigger (durably); whether it was there.
    pub fn remove_trigger(&self, id: &str) -> Result<bool, RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            let was = txn.open_table(TRIGGERS)?.remove(id)?.is_some();
            txn.commit()?;
            Ok(was)
        })
    }

    /// Every trigger, in id order.
    pub fn triggers(&self) -> Result<Vec<TriggerRecord>, RegistryError> {
        // Never written yet (a registry made before triggers): none.
        self.json_rows(TRIGGERS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_survive_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let path = dir.path().join("r.redb");
        let t = TriggerRecord {
            id: "t-1".into(),
            owner: "uid:1".into(),
            source: TriggerSource::Embedded,
            subject: "orders".into(),
            target: TriggerTarget::Bubble("b-1".into()),
            portion: "p".into(),
            function: "f".into(),
            batch_size: 4,
            max_concurrency: 1,
            max_deliver: 3,
            created_at_ms: 9,
            policy: Some(PortionPolicy {
                grants: vec![("p".into(), vec!["k".into()])],
                ..PortionPolicy::default()
            }),
            max_pending: 17,
            seal_to: Some([7; 32]),
        };
        {
            let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
            assert!(r.triggers().unwrap_or_default().is_empty());
            r.put_trigger(&t).unwrap_or_else(|_| unreachable!());
        }
        let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
        assert_eq!(r.triggers().unwrap_or_default(), vec![t]);
        assert!(r.remove_trigger("t-1").unwrap_or(false));
        assert!(!r.remove_trigger("t-1").unwrap_or(true));
        drop(r);
        let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
        assert!(r.triggers().unwrap_or_default().is_empty());
    }
}
