//! The broker's core: bubbles, their lifecycle and everything done to
//! them, in typed commands and results (no protobuf here; `crate::api`
//! turns gRPC requests into the commands of [`commands`]).
//!
//! One module per concern: the [`table`] of bubbles and their gates, the
//! [`lifecycle`] state machine, VMM supervision (`supervise`), admission,
//! create and boot, warm pools, pool owners, calls, attestation,
//! suspend/restore (`freeze`, `restore`), delete (`teardown`), metering
//! (`meter`), idle maintenance and record collection (`maintenance`) and
//! restart reconciliation (`reconcile`). See `docs/architecture.md`.

pub mod commands;
pub mod lifecycle;
pub(crate) mod table;

mod admin;
mod admission;
mod attest;
mod audit;
mod audit_open;
mod await_ends;
mod await_hooks;
mod await_limits;
mod await_relay;
mod awaits;
mod calls;
mod create;
mod dead_letters;
mod dispatch;
mod event_result;
mod freeze;
mod ledger;
mod logs;
mod maintenance;
mod meter;
mod owners;
mod pool_policy;
mod pools;
mod probes;
mod query;
mod reconcile;
mod restore;
mod scale;
pub mod security;
mod strikes;
mod supervise;
mod teardown;
mod thaw;
pub mod triggers;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tracing::warn;

pub use attest::{AttestationBundle, GuestBinding};
pub use audit::{AuditQuery, ANOTHER_PARENT};
pub use awaits::CallEnd;
pub use commands::*;
pub use lifecycle::{State, Step};
pub use logs::LogLine;
pub use meter::UsageFacts;
pub use probes::Probed;
pub use security::{SecurityEvent, SecurityKind};

pub(crate) use crate::clock::now_ms;
use crate::config::{self, BrokerConfig};
use crate::error::BrokerError;
use crate::obs::metrics::Metrics;
use crate::obs::usage::UsageSigner;
use crate::store::frozen::FrozenStore;
use crate::store::registry::{BubbleRecord, Registry};
use table::Table;

/// Capacity of each parent's event channel; a slow watcher skips events
/// (and is told how many) of its own parent only.
const EVENT_CAPACITY: usize = 1024;

/// A state change, as broadcast to watchers.
#[derive(Clone, Debug)]
pub struct Event {
    /// Owner of the bubble (events are only shown to it).
    pub owner: String,
    /// The bubble.
    pub bubble_id: String,
    /// Its new state.
    pub state: State,
    /// Why (failures), else empty.
    pub reason: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// A security event about the bubble (then `state` is its current
    /// state, unchanged).
    pub security: Option<SecurityEvent>,
}

/// Broker state shared by all connections.
pub struct Broker {
    cfg: BrokerConfig,
    registry: Arc<Registry>,
    /// Every bubble: record, running VMM and gate (the registry holds the
    /// durable copy of the records; BUSY and call counters live only here).
    table: Table,
    /// One event channel per parent: a watcher's lag counts only its own
    /// parent's events, and nothing of another tenant's reaches it.
    events: parking_lot::Mutex<std::collections::HashMap<String, broadcast::Sender<Event>>>,
    /// Guest and portion log lines, per bubble (`StreamLogs`).
    logs: logs::Logs,
    /// Every security event, for operators (`AdminWatchEvents`).
    admin_events: broadcast::Sender<SecurityEvent>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Wakes pool refillers (after an attach) and attach waiters (after a
    /// pooled bubble becomes READY).
    pool_changed: Arc<tokio::sync::Notify>,
    /// Records whose counters changed since the last flush.
    dirty: parking_lot::Mutex<HashSet<String>>,
    /// Pooled bubbles handed to a parent whose new owner is not on disk
    /// yet (see `pools`); the assignment flusher empties it.
    unsynced_owners: parking_lot::Mutex<HashSet<String>>,
    /// Wakes the assignment flusher.
    owners_kick: Arc<tokio::sync::Notify>,
    /// Ticks after every assignment flush (waiters re-check their bubble).
    owners_synced: tokio::sync::watch::Sender<u64>,
    /// Host-wide cap on total bubble memory, MiB.
    host_limit_mib: u64,
    usage_signer: UsageSigner,
    spawner: Arc<bubble_vmm_client::Spawner>,
    /// The TEE backend (the simulated virtual PSP on this host).
    psp: bubble_attestation::SimPsp,
    /// Set by [`Broker::shutdown_all`]: no new bubbles, no pool refills.
    closing: AtomicBool,
    /// Set by an operator's drain: no new bubbles (create, attach).
    draining: AtomicBool,
    /// Held while draining changes (registry and memory together).
    drain_lock: parking_lot::Mutex<()>,
    /// Encrypted store of suspended bubbles.
    frozen: FrozenStore,
    /// The broker's key-encryption key for frozen bubbles (0600 file).
    kek: bubble_keys::Kek,
    /// Serializes lifecycle steps that reach the registry (see
    /// `supervise::apply`).
    apply_serial: parking_lot::Mutex<()>,
    /// This broker's stable identity (`DATA_DIR/broker-id`), named in the
    /// claims it takes on frozen copies in a shared store.
    broker_id: String,
    /// The hash-chained audit log (`DATA_DIR/audit/audit.log`).
    audit: bubble_audit::AuditLog,
    /// The last dependency check (`obs::health`).
    pub(crate) health: tokio::sync::watch::Sender<crate::obs::health::Health>,
    /// The last health probe of each pooled bubble (`probes`).
    probes: parking_lot::Mutex<std::collections::HashMap<String, Probed>>,
    /// Strikes against modules and the quarantine list (`strikes`).
    ledger: parking_lot::Mutex<ledger::Ledger>,
    /// Held from a strike's change of the ledger to its registry write, so
    /// the writes land in order (`strikes`).
    strike_writes: parking_lot::Mutex<()>,
    /// The embedded event queue (`DATA_DIR/events.redb`).
    queue: bubble_events::embedded::EmbeddedQueue,
    /// Every trigger and its dispatcher's stop switch (`triggers`).
    triggers: parking_lot::Mutex<std::collections::HashMap<String, triggers::Running>>,
    /// Awaits this broker is resuming now (`awaits`).
    awaits: awaits::Resuming,
    /// Await slots reserved per owner (the per-owner cap).
    await_slots: await_limits::AwaitSlots,
}

/// Refuses to start on an empty registry beside bubble directories: the
/// registry was lost or replaced, and reconciling against it would stop
/// every running bubble as never recorded.
fn refuse_lost_registry(cfg: &BrokerConfig, records: usize) -> Result<(), BrokerError> {
    if records > 0 {
        return Ok(());
    }
    let dirs = std::fs::read_dir(cfg.data_dir.join("bubbles"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.len() == 34 && n.starts_with("b-")
        })
        .count();
    if dirs == 0 {
        return Ok(());
    }
    Err(BrokerError::Spawn(format!(
        "the registry {} holds no bubbles but {} holds {dirs} bubble director{}: \
         the registry was lost or replaced, and starting would stop those bubbles. \
         Put the registry back, or remove the directories to start afresh",
        cfg.registry_path().display(),
        cfg.data_dir.join("bubbles").display(),
        if dirs == 1 { "y" } else { "ies" },
    )))
}

/// Reads this broker's identity, or makes one (a random UUID).
fn load_or_create_id(path: &std::path::Path) -> Result<String, BrokerError> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(BrokerError::Spawn(format!("{}: {e}", path.display()))),
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| BrokerError::Spawn(format!("{}: {e}", path.display())))?;
    Ok(id)
}

/// Raises the soft open-files limit to the hard limit: the broker holds one
/// control socket per bubble.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

impl Broker {
    /// Opens the registry in `cfg.data_dir`, reconciles it with the VMM
    /// processes that still run (see [`Broker::reconcile`]) and starts the
    /// warm-pool refillers, the idle-policy ticker and the owner flusher.
    pub async fn open(cfg: BrokerConfig) -> Result<Arc<Self>, BrokerError> {
        raise_fd_limit();
        // A pool policy a parent could not ask for refuses the start.
        for p in &cfg.pools {
            pool_policy::profile_policy(p, cfg.max_payload).map_err(|e| {
                crate::error::invalid("pool.policy", format!("pool {:?}: {e}", p.name))
            })?;
        }
        bubble_vmm_client::set_answer_poll(Duration::from_micros(u64::from(cfg.answer_poll_us)));
        std::fs::create_dir_all(cfg.data_dir.join("bubbles"))
            .map_err(|e| BrokerError::Spawn(format!("data dir {:?}: {e}", cfg.data_dir)))?;
        let registry = Arc::new(Registry::open(&cfg.registry_path())?);
        let draining = registry.draining()?;
        if draining {
            warn!("starting drained: new bubbles are refused until `bubblectl admin drain --undo`");
        }
        let records = registry.all()?;
        refuse_lost_registry(&cfg, records.len())?;
        let mut ledger = ledger::Ledger::new(
            cfg.security.clone(),
            registry.quarantines()?,
            registry.strike_entries()?,
            now_ms(),
        );
        // Expired and unreadable strike entries go now.
        let pruned: Vec<String> = ledger.take_pending().into_keys().collect();
        registry.update_strikes(&[], &pruned)?;
        let table = Table::from_records(records);
        let usage_signer = UsageSigner::load_or_create(&cfg.data_dir.join("usage-signing.key"))
            .map_err(BrokerError::Spawn)?;
        let host_limit_mib =
            (config::host_memory_mib() as f64 * cfg.quota.host_overcommit_ratio) as u64;
        let psp = bubble_attestation::SimPsp::load_or_create(&cfg.data_dir.join("psp"))
            .map_err(|e| BrokerError::Spawn(e.to_string()))?;
        warn!("attestation backend: sim (virtual PSP; SIMULATED, no hardware protection)");
        let spawner = bubble_vmm_client::Spawner::new(
            cfg.vmm_program.clone(),
            cfg.vmm_args_prefix.clone(),
            cfg.data_dir.join("spares"),
            cfg.spare_vmms,
            jail_spec(
                &cfg.jail,
                &cfg.data_dir,
                (cfg.quota.max_memory_mib_per_parent << 20)
                    + u64::from(cfg.quota.max_bubbles_per_parent)
                        * bubble_vmm_client::cgroups::VMM_OVERHEAD,
            )?,
        );
        spawner.refill();
        // TLS for S3 uses rustls with the ring provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut frozen = match &cfg.store_url {
            Some(u) => FrozenStore::s3(u)?,
            None => FrozenStore::local(&cfg.store_dir)?,
        };
        frozen.set_lease(cfg.claim_lease);
        // Made now, so that no refusal pays for making it (an oracle).
        frozen.ensure_decoy().await;
        let kek = bubble_keys::Kek::load_or_create(&cfg.data_dir.join("kek"))
            .map_err(|e| BrokerError::Store(format!("key-encryption key: {e}")))?;
        frozen.set_index_key(kek.derive(crate::store::frozen::awaits::INDEX_KEY_LABEL));
        let broker_id = load_or_create_id(&cfg.data_dir.join("broker-id"))?;
        let audit = audit_open::open_audit(&cfg, &registry, &usage_signer)?;
        let queue = bubble_events::embedded::EmbeddedQueue::open(
            &cfg.events_path(),
            bubble_events::embedded::QueueConfig {
                ack_wait: Duration::from_millis(cfg.events.ack_wait_ms.max(1)),
                // A backstop: each trigger dead-letters at its own
                // max_deliver (at most 100).
                max_deliver: 1000,
                ..Default::default()
            },
        )
        .map_err(|e| BrokerError::Spawn(format!("event queue: {e}")))?;
        let broker = Arc::new(Self {
            queue,
            triggers: Default::default(),
            awaits: Default::default(),
            await_slots: Default::default(),
            health: tokio::sync::watch::channel(Default::default()).0,
            probes: Default::default(),
            ledger: parking_lot::Mutex::new(ledger),
            strike_writes: Default::default(),
            audit,
            broker_id,
            apply_serial: Default::default(),
            frozen,
            kek,
            psp,
            closing: AtomicBool::new(false),
            draining: AtomicBool::new(draining),
            drain_lock: parking_lot::Mutex::new(()),
            spawner,
            cfg,
            registry,
            table,
            events: Default::default(),
            admin_events: broadcast::channel(EVENT_CAPACITY).0,
            logs: Default::default(),
            metrics: Metrics::new(),
            pool_changed: Arc::new(tokio::sync::Notify::new()),
            dirty: Default::default(),
            unsynced_owners: Default::default(),
            owners_kick: Arc::new(tokio::sync::Notify::new()),
            owners_synced: tokio::sync::watch::channel(0).0,
            host_limit_mib,
            usage_signer,
        });
        broker.reconcile().await?;
        broker.resume_triggers()?;
        for p in broker.cfg.pools.clone() {
            tokio::spawn(Self::refill_loop(Arc::downgrade(&broker), p));
        }
        tokio::spawn(Self::maintenance_loop(Arc::downgrade(&broker)));
        tokio::spawn(Self::health_loop(Arc::downgrade(&broker)));
        tokio::spawn(Self::probe_loop(Arc::downgrade(&broker)));
        tokio::spawn(Self::await_sweeper(Arc::downgrade(&broker)));
        tokio::spawn(Self::owner_flusher(
            Arc::downgrade(&broker),
            broker.owners_kick.clone(),
        ));
        Ok(broker)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// Subscribes to the state changes of `parent`'s bubbles.
    pub fn subscribe(&self, parent: &str) -> broadcast::Receiver<Event> {
        self.events
            .lock()
            .entry(parent.to_string())
            .or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe()
    }

    /// Every parent's security events from now on (operator only).
    pub fn admin_subscribe(
        &self,
        admin: &str,
    ) -> Result<broadcast::Receiver<SecurityEvent>, BrokerError> {
        self.require_admin(admin)?;
        Ok(self.admin_events.subscribe())
    }

    /// Sends an event to its owner's watchers (if any watch).
    pub(crate) fn emit(&self, ev: Event) {
        let mut m = self.events.lock();
        let owner = ev.owner.clone();
        let unwatched = m.get(&owner).is_some_and(|tx| tx.send(ev).is_err());
        if unwatched {
            m.remove(&owner);
        }
    }

    /// Commits an empty registry transaction (health check).
    pub(crate) fn registry_probe(&self) -> Result<(), BrokerError> {
        Ok(self.registry.probe()?)
    }

    /// Reads from the frozen store (health check).
    pub(crate) async fn store_probe(&self) -> Result<(), String> {
        self.frozen.probe().await
    }

    /// The audit log.
    pub fn audit_log(&self) -> &bubble_audit::AuditLog {
        &self.audit
    }

    /// The key that signs usage reports.
    pub fn usage_signer(&self) -> &UsageSigner {
        &self.usage_signer
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Returns the caller's record or the uniform not-accessible error.
    pub fn owned(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        match self.table.get(id) {
            Some(r) if !r.owner.is_empty() && r.owner == parent => Ok(r),
            _ => Err(BrokerError::NotAccessible(id.to_string())),
        }
    }

    /// Takes the gate of one of `parent`'s bubbles (see [`table`]),
    /// waiting at most `wait`, once its owner is on disk.
    pub(crate) async fn permit_owned(
        &self,
        parent: &str,
        id: &str,
        wait: Duration,
    ) -> Result<table::Permit, BrokerError> {
        self.owned_synced(parent, id).await?;
        let p = tokio::time::timeout(wait, self.table.permit(id))
            .await
            .map_err(|_| BrokerError::Queued(id.to_string()))?
            .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
        // The owner cannot change once set; checked again for clarity.
        if p.rec.owner != parent {
            return Err(BrokerError::NotAccessible(id.to_string()));
        }
        Ok(p)
    }

    /// Stops every VMM (used by tests and the demo; a production broker
    /// leaves them running so a restarted broker re-adopts them).
    pub async fn shutdown_all(self: &Arc<Self>) {
        self.closing.store(true, Ordering::SeqCst);
        self.stop_triggers();
        // Let creates already past admission register their VMMs.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self
            .table
            .with(|t| t.records().any(|r| r.state == State::Booting))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.flush_counters();
        if let Err(e) = self.sync_owners_now().await {
            warn!(error = %e, "persisting attach assignments at shutdown failed");
        }
        for l in self.table.drain_live() {
            l.vmm.shutdown().await;
        }
    }
}

/// How VMMs are jailed under `[jail]`: a uid each from its range when the
/// broker is root, else (or when forced) the user-namespace path.
/// Bubble cgroups go under `bubbled-<id of data_dir>`, a parent's
/// memory limited to `parent_memory` bytes.
fn jail_spec(
    j: &crate::config::JailConfig,
    data_dir: &std::path::Path,
    parent_memory: u64,
) -> Result<bubble_vmm_client::JailSpec, BrokerError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uids = if j.namespaces && root {
        let (lo, hi) = j.uid_range().map_err(BrokerError::Spawn)?;
        Some(bubble_vmm_client::UidPool::new(lo, hi))
    } else {
        None
    };
    // One hierarchy per data directory (see `cgroup_hierarchy`).
    let name = crate::datadir::cgroup_hierarchy(data_dir)
        .map_err(|e| BrokerError::Spawn(format!("the cgroup hierarchy's id: {e}")))?;
    let cgroups = match bubble_vmm_client::cgroups::Cgroups::detect(&name, parent_memory) {
        Ok(c) => {
            let c = std::sync::Arc::new(c);
            // What killed brokers of this host left, then every GRACE the
            // parent cgroups no bubble was made in since (bubbles' exits
            // remove their own only); off the serving path and at
            // background priority (each rmdir waits for the kernel). Ends
            // with the broker's cgroups.
            let sweeper = std::sync::Arc::downgrade(&c);
            let _ = std::thread::Builder::new()
                .name("cgroup-sweep".into())
                .spawn(move || {
                    use bubble_vmm_client::cgroups::parents::GRACE;
                    bubble_vmm::priority::set_nice(0, bubble_vmm::priority::BACKGROUND_NICE);
                    let Some(n) = sweeper.upgrade().map(|c| c.sweep_stale()) else {
                        return;
                    };
                    tracing::info!(
                        hierarchies = n,
                        "cgroup sweep done: removed the empty cgroups left by stopped brokers"
                    );
                    loop {
                        std::thread::sleep(GRACE);
                        let Some(c) = sweeper.upgrade() else { return };
                        let n = c.sweep_parents();
                        if n > 0 {
                            tracing::debug!(parents = n, "unused parent cgroups removed");
                        }
                    }
                });
            Ok(c)
        }
        Err(e) => {
            warn!(error = %e, "bubbles run WITHOUT cgroups (no memory, pids or cpu limits)");
            Err(format!("no cgroup: {e}"))
        }
    };
    Ok(bubble_vmm_client::JailSpec {
        namespaces: j.namespaces,
        userns: j.userns || !root,
        uids,
        cgroups: Some(cgroups),
    })
}
