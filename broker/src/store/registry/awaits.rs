//! Awaits in the registry: one JSON record per awaiting portion call,
//! keyed by its await id (see `core::awaits`), in the same redb database
//! as the bubbles. The shared store holds the same record as an index
//! object (`store::frozen::awaits`) so that another broker can find it.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::triggers::TriggerSource;
use super::{Registry, RegistryError};

/// Await records keyed by await id.
const AWAITS: TableDefinition<&str, &[u8]> = TableDefinition::new("awaits_v1");

/// What started the call that awaits: where its result goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AwaitOrigin {
    /// An event of a trigger: the result is published once under the
    /// event's key on the trigger's subject.
    Event {
        /// The trigger that ran it.
        trigger_id: String,
        /// Its subject (as the owner named it).
        subject: String,
        /// Its source.
        source: TriggerSource,
        /// The event's key, as the owner gave it.
        key: String,
        /// Whether the bubble came from the trigger's pool (deleted once
        /// the call ends).
        pool: bool,
        /// Whether the call's result is sealed (the trigger's `seal_to`;
        /// the bubble seals the resumed call's answer to it).
        #[serde(default)]
        sealed: bool,
        /// SHA-256 of the portion-call frame the bubble signs (and the
        /// sealed box's AAD): kept so the resumed result carries it.
        #[serde(default)]
        input_sha256: [u8; 32],
    },
    /// A parent's `Call`: the call's answer was "awaiting".
    Call,
}

impl AwaitOrigin {
    /// Whether the call's result is sealed, and the digest of the frame
    /// the bubble signed (unknown for a direct call: zero).
    pub fn signed_as(&self) -> (bool, [u8; 32]) {
        match self {
            AwaitOrigin::Event {
                sealed,
                input_sha256,
                ..
            } => (*sealed, *input_sha256),
            AwaitOrigin::Call => (false, [0; 32]),
        }
    }
}

/// Where an await is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AwaitPhase {
    /// Recorded; the bubble is being frozen (an event now is retried).
    Freezing,
    /// The bubble is frozen at `generation`: the next event resumes it.
    Frozen,
    /// Resumed (by an event or the timeout), or the freeze failed: later
    /// events with the key are dropped; a new await may take the key.
    Ended,
}

/// One awaiting call, as stored (registry and store index alike).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwaitRecord {
    /// The await id: 32 hex digits of SHA-256(owner, key).
    pub id: String,
    /// The parent that owns the bubble.
    pub owner: String,
    /// The key the portion awaits (as the portion named it).
    pub key: String,
    /// The frozen bubble.
    pub bubble_id: String,
    /// Its frozen generation.
    pub generation: u64,
    /// When the await times out, Unix ms.
    pub deadline_ms: u64,
    /// Whether the awaiting call was signed (its answer is a signed result).
    pub signed: bool,
    /// What started the call.
    pub origin: AwaitOrigin,
    /// The broker that froze it.
    pub broker: String,
    /// When it was recorded, Unix ms.
    pub created_at_ms: u64,
    /// Where it is.
    pub phase: AwaitPhase,
    /// When it ended (ENDED), Unix ms: the index entry is collected a
    /// retention after this (0 in entries written before it was kept:
    /// collected at the next sweep).
    #[serde(default)]
    pub ended_at_ms: u64,
}

impl Registry {
    /// Stores an await (durably), replacing one with the same id.
    pub fn put_await(&self, a: &AwaitRecord) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(a).map_err(|e| RegistryError::corrupt(&a.id, e))?;
        self.write(|db| {
            let txn = db.begin_write()?;
            txn.open_table(AWAITS)?
                .insert(a.id.as_str(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Removes an await (durably) if it is still for `bubble_id` at
    /// `generation`; whether it was removed.
    pub fn remove_await(
        &self,
        id: &str,
        bubble_id: &str,
        generation: u64,
    ) -> Result<bool, RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            let removed = {
                let mut t = txn.open_table(AWAITS)?;
                let matches = match t.get(id)? {
                    Some(v) => serde_json::from_slice::<AwaitRecord>(v.value())
                        .map(|a| a.bubble_id == bubble_id && a.generation == generation)
                        .unwrap_or(true),
                    None => false,
                };
                if matches {
                    t.remove(id)?;
                }
                matches
            };
            txn.commit()?;
            Ok(removed)
        })
    }

    /// The await `id`, if recorded here.
    pub fn get_await(&self, id: &str) -> Result<Option<AwaitRecord>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = match txn.open_table(AWAITS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match t.get(id)? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(|e| RegistryError::corrupt(id, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Every await recorded here, in id order.
    pub fn awaits(&self) -> Result<Vec<AwaitRecord>, RegistryError> {
        self.json_rows(AWAITS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(id: &str, generation: u64) -> AwaitRecord {
        AwaitRecord {
            id: id.into(),
            owner: "uid:1".into(),
            key: "capture-1".into(),
            bubble_id: "b-1".into(),
            generation,
            deadline_ms: 99,
            signed: true,
            origin: AwaitOrigin::Event {
                trigger_id: "t-1".into(),
                subject: "orders".into(),
                source: TriggerSource::Embedded,
                key: "order-1".into(),
                pool: false,
                sealed: true,
                input_sha256: [3; 32],
            },
            broker: "b".into(),
            created_at_ms: 1,
            phase: AwaitPhase::Frozen,
            ended_at_ms: 0,
        }
    }

    #[test]
    fn awaits_survive_reopen_and_removal_checks_the_generation() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let path = dir.path().join("r.redb");
        let a = sample("a1", 3);
        {
            let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
            assert!(r.awaits().unwrap_or_default().is_empty());
            assert_eq!(r.get_await("a1").ok(), Some(None));
            r.put_await(&a).unwrap_or_else(|_| unreachable!());
        }
        let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
        assert_eq!(r.awaits().unwrap_or_default(), vec![a.clone()]);
        assert_eq!(r.get_await("a1").ok(), Some(Some(a)));
        // A stale remover (an older generation) removes nothing.
        assert!(!r.remove_await("a1", "b-1", 2).unwrap_or(true));
        assert!(r.remove_await("a1", "b-1", 3).unwrap_or(false));
        assert!(!r.remove_await("a1", "b-1", 3).unwrap_or(true));
        drop(r);
        let r = Registry::open(&path).unwrap_or_else(|_| unreachable!());
        assert!(r.awaits().unwrap_or_default().is_empty());
    }
}
