//! The broker's registry of bubbles, persisted in an embedded `redb` database.
//!
//! Every state change is written before it is acted on or reported, so a
//! restarted broker finds every bubble it ever made: running ones are
//! re-adopted, the others are marked FAILED with a reason
//! (see [`crate::core::Broker::reconcile`]).

mod draining;
mod error;
mod pins;
mod quarantine;
mod strikes;

pub use error::RegistryError;
pub use quarantine::Quarantine;
pub use strikes::StrikeEntry;

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub mod awaits;
pub mod triggers;

/// Bubble records keyed by bubble id; values are JSON-encoded [`BubbleRecord`]s.
const BUBBLES: TableDefinition<&str, &[u8]> = TableDefinition::new("bubbles_v1");
/// Idempotency index: `owner \0 client_request_id` → bubble id.
const REQUESTS: TableDefinition<&str, &str> = TableDefinition::new("create_requests_v1");

/// Lifecycle state of a bubble as stored in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// The VMM process is starting the guest.
    Booting,
    /// The guest answered READY and takes calls.
    Ready,
    /// A call is in progress.
    Busy,
    /// Frozen to the store (no VM runs).
    Suspended,
    /// The bubble died; see `failure_reason`.
    Failed,
    /// Deleted by its owner; kept as a tombstone.
    Deleted,
}

impl State {
    /// Whether a VMM process is expected to run for a bubble in this state.
    pub fn expects_vmm(self) -> bool {
        matches!(self, State::Booting | State::Ready | State::Busy)
    }
}

/// One bubble as stored in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BubbleRecord {
    /// Bubble id (`b-` + 32 hex digits).
    pub id: String,
    /// Parent identity that owns the bubble (empty while in the warm pool).
    pub owner: String,
    /// The owner's idempotency key for the create.
    pub client_request_id: String,
    /// Current state.
    pub state: State,
    /// Why the bubble failed (empty unless FAILED).
    pub failure_reason: String,
    /// The kind of that failure (a `FailureKind` label, as in
    /// `bubbled_failures_total{reason}`; empty unless FAILED, and in
    /// records written before kinds were kept).
    #[serde(default)]
    pub failure_kind: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest image name.
    pub image: String,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: u64,
    /// Guest boot time in microseconds (0 until READY).
    pub boot_us: u64,
    /// Pid of the VMM process (0 when none).
    pub vmm_pid: u32,
    /// Completed calls.
    pub calls: u64,
    /// Warm-pool profile the bubble was booted for (empty: direct create).
    #[serde(default)]
    pub profile: String,
    /// Idle policy.
    #[serde(default)]
    pub idle: IdleRule,
    /// Last call or attach, Unix milliseconds (drives the idle policy).
    #[serde(default)]
    pub last_active_ms: u64,
    /// Metering counters.
    #[serde(default)]
    pub usage: Meter,
    /// Security policy for portions.
    #[serde(default)]
    pub policy: PortionPolicy,
    /// Portions loaded, in order: (name, SHA-384 of the module, hex).
    #[serde(default)]
    pub portions: Vec<(String, String)>,
    /// Suspend generation (incremented by every suspend).
    #[serde(default)]
    pub generation: u64,
    /// The frozen copy that a restore must use, while SUSPENDED.
    #[serde(default)]
    pub frozen: Option<FrozenRef>,
    /// When the bubble reached FAILED or DELETED, Unix milliseconds (0:
    /// not ended); the record is collected a retention period later.
    #[serde(default)]
    pub ended_at_ms: u64,
    /// The last suspend (or the import) used a key the parent holds: the
    /// idle policy never suspends the bubble again under the broker's key.
    #[serde(default)]
    pub parent_keyed: bool,
    /// What of its VMM's jail could not be set up (empty: all of it).
    #[serde(default)]
    pub jail_warning: String,
}

/// Where a suspended bubble's frozen copy is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenRef {
    /// Its generation.
    pub generation: u64,
    /// Whether a parent-held key wraps its data key.
    pub parent_key: bool,
}

/// A bubble's security policy for code portions (see the proto).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortionPolicy {
    /// Fuel per call.
    pub fuel_per_call: u64,
    /// Linear-memory limit, bytes.
    pub memory_limit_bytes: u32,
    /// Wall-clock deadline per portion call, ms.
    pub call_deadline_ms: u32,
    /// Largest output, bytes.
    pub max_output_bytes: u32,
    /// (portion, credentials it may use).
    pub grants: Vec<(String, Vec<String>)>,
    /// Uses per second and burst of each credential (absent in records
    /// written before it existed: no limit).
    #[serde(default)]
    pub credential_rate: Option<(u32, u32)>,
}

impl Default for PortionPolicy {
    /// The attestation crate's default policy (one definition for the
    /// broker and the verifying client).
    fn default() -> Self {
        let d = bubble_attestation::SecurityPolicy::default();
        Self {
            fuel_per_call: d.fuel_per_call,
            memory_limit_bytes: d.memory_limit_bytes,
            call_deadline_ms: d.call_deadline_ms,
            max_output_bytes: d.max_output_bytes,
            grants: d.grants,
            credential_rate: None,
        }
    }
}

impl PortionPolicy {
    /// The bytes the guest's `set_policy` op takes (and whose SHA-256 the
    /// attestation binds).
    pub fn encode(&self) -> Vec<u8> {
        self.wire().encode()
    }

    /// The policy in the attestation crate's canonical form, whose
    /// encoding the client recomputes when it verifies a bubble.
    pub fn wire(&self) -> bubble_attestation::SecurityPolicy {
        bubble_attestation::SecurityPolicy {
            fuel_per_call: self.fuel_per_call,
            memory_limit_bytes: self.memory_limit_bytes,
            call_deadline_ms: self.call_deadline_ms,
            max_output_bytes: self.max_output_bytes,
            grants: self.grants.clone(),
            credential_rate: self
                .credential_rate
                .map(|(per_sec, burst)| bubble_abi::CredentialRate { per_sec, burst }),
        }
    }
}

/// What happens to an idle bubble.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdleAction {
    /// Nothing.
    #[default]
    Stay,
    /// Suspend it to the store.
    Suspend,
    /// Delete it.
    Delete,
}

/// A bubble's idle policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleRule {
    /// Seconds without calls before `action` (0: never).
    pub timeout_s: u32,
    /// The action.
    pub action: IdleAction,
}

pub use super::meter::Meter;

/// How long [`Registry::open`] waits for another process to release the
/// database.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Handle to the registry database.
pub struct Registry {
    /// The open database; `None` only while it is being reopened.
    db: parking_lot::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    /// A write failed (e.g. the disk was full): redb refuses everything
    /// after an I/O error until it is reopened, so the next operation
    /// reopens it (which recovers from the last durable commit).
    broken: std::sync::atomic::AtomicBool,
}

fn request_key(owner: &str, client_request_id: &str) -> String {
    format!("{owner}\0{client_request_id}")
}

impl Registry {
    /// Opens (or creates) the registry at `path`.
    ///
    /// A previous broker that was just killed may still hold the file's
    /// lock for a moment (a VMM it was forking when it died holds the
    /// descriptor until it execs or dies): opening retries for up to
    /// [`LOCK_WAIT`] before it reports the database as in use.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let txn = db.begin_write()?;
        {
            txn.open_table(BUBBLES)?;
            txn.open_table(REQUESTS)?;
            txn.open_table(quarantine::QUARANTINE)?;
            txn.open_table(strikes::STRIKES)?;
            txn.open_table(pins::META)?;
        }
        txn.commit()?;
        Ok(Self {
            db: parking_lot::RwLock::new(Some(db)),
            path: path.to_path_buf(),
            broken: Default::default(),
        })
    }

    /// The database, reopened first if a write failed.
    fn handle(&self) -> Result<parking_lot::MappedRwLockReadGuard<'_, Database>, RegistryError> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::SeqCst) {
            let mut w = self.db.write();
            if self.broken.load(Ordering::SeqCst) {
                // Close before opening: the file lock is the handle's.
                drop(w.take());
                *w = Some(Database::create(&self.path)?);
                self.broken.store(false, Ordering::SeqCst);
            }
        }
        parking_lot::RwLockReadGuard::try_map(self.db.read(), Option::as_ref)
            .map_err(|_| RegistryError::Db("the registry could not be reopened".into()))
    }

    /// Runs a write transaction; a failure marks the database for reopening.
    fn write<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let r = f(&*self.handle()?);
        if r.is_err() {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    /// Commits an empty write transaction: whether the registry can
    /// commit now (health check).
    pub fn probe(&self) -> Result<(), RegistryError> {
        self.write(|db| Ok(db.begin_write()?.commit()?))
    }

    /// Inserts a new record and its idempotency key atomically.
    ///
    /// Returns the existing record instead if the owner already used the key.
    pub fn insert_new(&self, rec: &BubbleRecord) -> Result<Option<BubbleRecord>, RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            let existing;
            {
                let mut reqs = txn.open_table(REQUESTS)?;
                let key = request_key(&rec.owner, &rec.client_request_id);
                let prior = reqs.get(key.as_str())?.map(|v| v.value().to_string());
                match prior {
                    Some(id) => {
                        let bubbles = txn.open_table(BUBBLES)?;
                        let got = bubbles.get(id.as_str())?.map(|v| v.value().to_vec());
                        existing = match got {
                            Some(bytes) => Some(decode(&id, &bytes)?),
                            None => None,
                        };
                    }
                    None => {
                        existing = None;
                        reqs.insert(key.as_str(), rec.id.as_str())?;
                        let mut bubbles = txn.open_table(BUBBLES)?;
                        bubbles.insert(rec.id.as_str(), encode(rec).as_slice())?;
                    }
                }
            }
            txn.commit()?;
            Ok(existing)
        })
    }

    /// The bubble id an owner's idempotency key maps to, if any.
    pub fn request(
        &self,
        owner: &str,
        client_request_id: &str,
    ) -> Result<Option<String>, RegistryError> {
        if client_request_id.is_empty() {
            return Ok(None);
        }
        let txn = self.handle()?.begin_read()?;
        let reqs = txn.open_table(REQUESTS)?;
        let key = request_key(owner, client_request_id);
        let got = reqs.get(key.as_str())?.map(|v| v.value().to_string());
        Ok(got)
    }

    /// Writes records that just got their owner (warm-pool attach),
    /// each with its owner's idempotency key, in one durable transaction.
    pub fn assign_many(&self, recs: &[BubbleRecord]) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut reqs = txn.open_table(REQUESTS)?;
                let mut bubbles = txn.open_table(BUBBLES)?;
                for rec in recs {
                    let key = request_key(&rec.owner, &rec.client_request_id);
                    reqs.insert(key.as_str(), rec.id.as_str())?;
                    bubbles.insert(rec.id.as_str(), encode(rec).as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Writes (replaces) a record.
    pub fn put(&self, rec: &BubbleRecord) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut bubbles = txn.open_table(BUBBLES)?;
                bubbles.insert(rec.id.as_str(), encode(rec).as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Reads one record.
    pub fn get(&self, id: &str) -> Result<Option<BubbleRecord>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let bubbles = txn.open_table(BUBBLES)?;
        let got = bubbles.get(id)?.map(|v| v.value().to_vec());
        got.map(|bytes| decode(id, &bytes)).transpose()
    }

    /// Writes several records in one transaction.
    pub fn put_many<'a>(
        &self,
        recs: impl IntoIterator<Item = &'a BubbleRecord>,
    ) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut bubbles = txn.open_table(BUBBLES)?;
                for rec in recs {
                    bubbles.insert(rec.id.as_str(), encode(rec).as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Deletes records and their owners' idempotency keys in one
    /// transaction (records collected after their retention period).
    pub fn remove_many(&self, recs: &[BubbleRecord]) -> Result<(), RegistryError> {
        self.write(|db| {
            let txn = db.begin_write()?;
            {
                let mut reqs = txn.open_table(REQUESTS)?;
                let mut bubbles = txn.open_table(BUBBLES)?;
                for rec in recs {
                    let key = request_key(&rec.owner, &rec.client_request_id);
                    // Only if the key still names this bubble.
                    let names_it = reqs.get(key.as_str())?.map(|v| v.value() == rec.id);
                    if names_it == Some(true) {
                        reqs.remove(key.as_str())?;
                    }
                    bubbles.remove(rec.id.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Reads every record.
    pub fn all(&self) -> Result<Vec<BubbleRecord>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let bubbles = txn.open_table(BUBBLES)?;
        let mut out = Vec::new();
        for entry in bubbles.iter()? {
            let (k, v) = entry?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}

fn encode(rec: &BubbleRecord) -> Vec<u8> {
    // Serializing a plain struct of strings and integers cannot fail.
    serde_json::to_vec(rec).unwrap_or_default()
}

fn decode(id: &str, bytes: &[u8]) -> Result<BubbleRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::corrupt(id, e))
}

impl Registry {
    /// Every row of a table of JSON records keyed by id, in id order (none
    /// if the table was never written).
    pub(super) fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, RegistryError> {
        let txn = self.handle()?.begin_read()?;
        let t = match txn.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| RegistryError::corrupt(k.value(), e))?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn rec(id: &str, owner: &str, req: &str) -> BubbleRecord {
        BubbleRecord {
            id: id.into(),
            owner: owner.into(),
            client_request_id: req.into(),
            state: State::Booting,
            failure_reason: String::new(),
            failure_kind: String::new(),
            memory_mib: 16,
            vcpus: 1,
            image: "shim".into(),
            created_at_ms: 1,
            boot_us: 0,
            vmm_pid: 0,
            calls: 0,
            profile: String::new(),
            idle: IdleRule::default(),
            last_active_ms: 0,
            usage: Meter::default(),
            policy: PortionPolicy::default(),
            portions: Vec::new(),
            generation: 0,
            frozen: None,
            ended_at_ms: 0,
            parent_keyed: false,
            jail_warning: String::new(),
        }
    }

    #[test]
    fn insert_is_idempotent_per_owner_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path).unwrap();
            assert!(r.insert_new(&rec("b1", "alice", "k")).unwrap().is_none());
            let again = r.insert_new(&rec("b2", "alice", "k")).unwrap().unwrap();
            assert_eq!(again.id, "b1");
            // Same key, other owner: a different bubble.
            assert!(r.insert_new(&rec("b3", "bob", "k")).unwrap().is_none());
            let mut b1 = r.get("b1").unwrap().unwrap();
            b1.state = State::Ready;
            r.put(&b1).unwrap();
        }
        let r = Registry::open(&path).unwrap();
        let all = r.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(r.get("b1").unwrap().unwrap().state, State::Ready);
        assert!(r.get("b2").unwrap().is_none());
    }

    #[test]
    fn a_failed_write_reopens_the_database_before_the_next_operation() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        r.put(&rec("b1", "alice", "k")).unwrap();
        // What a failed commit leaves: the next operation reopens first.
        r.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(r.get("b1").unwrap().unwrap().owner, "alice");
        assert!(!r.broken.load(std::sync::atomic::Ordering::SeqCst));
        r.put(&rec("b2", "bob", "k")).unwrap();
        assert_eq!(r.all().unwrap().len(), 2);
    }

    #[test]
    fn collected_records_free_their_request_key_only_if_it_is_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        let old = rec("b1", "alice", "k");
        assert!(r.insert_new(&old).unwrap().is_none());
        assert!(r.insert_new(&rec("b2", "alice", "k2")).unwrap().is_none());
        r.remove_many(std::slice::from_ref(&old)).unwrap();
        assert!(r.get("b1").unwrap().is_none());
        assert_eq!(r.request("alice", "k").unwrap(), None);
        // The key is free again and maps to the new bubble.
        assert!(r.insert_new(&rec("b3", "alice", "k")).unwrap().is_none());
        // Removing the old record again leaves the new mapping alone.
        r.remove_many(&[old]).unwrap();
        assert_eq!(r.request("alice", "k").unwrap().as_deref(), Some("b3"));
        assert_eq!(r.all().unwrap().len(), 2);
    }
}
