//! The broker: bubble lifecycle, ownership checks and the `bubble.v1.Broker`
//! gRPC service.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_server::Broker as BrokerApi;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::config::{self, BrokerConfig, PoolProfile};
use crate::error::{invalid, BrokerError};
use crate::identity::parent_of;
use crate::metrics::Metrics;
use crate::registry::{BubbleRecord, IdleAction, IdleRule, PortionPolicy, Registry, State};
use crate::usage::UsageSigner;
use crate::vmm::{CallFailure, ImageSpec, Vmm, VmmNotice};

/// Capacity of the event broadcast channel; slow watchers skip events.
const EVENT_CAPACITY: usize = 4096;
/// How long an operation waits for its bubble's attach to reach the disk.
const OWNER_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// A state change, as broadcast to watchers.
#[derive(Clone, Debug)]
pub struct Event {
    /// Owner of the bubble (events are only shown to it).
    pub owner: String,
    /// The change.
    pub event: pb::BubbleEvent,
}

/// A bubble whose VMM process runs.
struct Live {
    vmm: Vmm,
    /// Serializes calls: a bubble has one vCPU.
    call_lock: tokio::sync::Mutex<()>,
}

/// Broker state shared by all connections.
pub struct Broker {
    cfg: BrokerConfig,
    registry: Registry,
    /// In-memory view of every record (authoritative copy is the registry;
    /// BUSY and call counters live only here).
    records: Mutex<HashMap<String, BubbleRecord>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    events: broadcast::Sender<Event>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Wakes pool refillers (after an attach) and attach waiters (after a
    /// pooled bubble becomes READY).
    pool_changed: Arc<tokio::sync::Notify>,
    /// Records whose counters changed since the last flush.
    dirty: Mutex<std::collections::HashSet<String>>,
    /// Pooled bubbles handed to a parent whose new owner is not on disk
    /// yet (see [`Broker::attach`]); the assignment flusher empties it.
    unsynced_owners: Mutex<std::collections::HashSet<String>>,
    /// Wakes the assignment flusher.
    owners_kick: Arc<tokio::sync::Notify>,
    /// Ticks after every assignment flush (waiters re-check their bubble).
    owners_synced: tokio::sync::watch::Sender<u64>,
    /// Host-wide cap on total bubble memory, MiB.
    host_limit_mib: u64,
    usage_signer: UsageSigner,
    spawner: Arc<bubble_vmm::client::Spawner>,
    /// The TEE backend (the simulated virtual PSP on this host).
    psp: bubble_attestation::SimPsp,
    /// Set by [`Broker::shutdown_all`]: no new bubbles, no pool refills.
    closing: std::sync::atomic::AtomicBool,
    /// Encrypted store of suspended bubbles.
    frozen: crate::frozen::FrozenStore,
    /// The broker's key-encryption key for frozen bubbles (0600 file).
    kek: bubble_keys::Kek,
}

/// The record `parent` made (or attached) with `client_request_id`.
fn by_request<'a>(
    records: &'a HashMap<String, BubbleRecord>,
    parent: &str,
    client_request_id: &str,
) -> Option<&'a BubbleRecord> {
    records
        .values()
        .find(|r| r.owner == parent && r.client_request_id == client_request_id)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Proto state of a registry state.
pub fn state_to_pb(s: State) -> pb::BubbleState {
    match s {
        State::Booting => pb::BubbleState::Booting,
        State::Ready => pb::BubbleState::Ready,
        State::Busy => pb::BubbleState::Busy,
        State::Suspended => pb::BubbleState::Suspended,
        State::Failed => pb::BubbleState::Failed,
        State::Deleted => pb::BubbleState::Deleted,
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Booting => "BOOTING",
        State::Ready => "READY",
        State::Busy => "BUSY",
        State::Suspended => "SUSPENDED",
        State::Failed => "FAILED",
        State::Deleted => "DELETED",
    }
}

fn to_pb(r: &BubbleRecord) -> pb::Bubble {
    pb::Bubble {
        bubble_id: r.id.clone(),
        owner: r.owner.clone(),
        state: state_to_pb(r.state) as i32,
        failure_reason: r.failure_reason.clone(),
        memory_mib: r.memory_mib,
        vcpus: r.vcpus,
        image: r.image.clone(),
        client_request_id: r.client_request_id.clone(),
        created_at_ms: r.created_at_ms,
        boot_us: r.boot_us,
        vmm_pid: r.vmm_pid,
        calls: r.calls,
        profile: r.profile.clone(),
        idle: Some(idle_to_pb(r.idle)),
        generation: r.generation,
    }
}

fn idle_to_pb(i: IdleRule) -> pb::IdlePolicy {
    pb::IdlePolicy {
        idle_timeout_s: i.timeout_s,
        action: match i.action {
            IdleAction::Stay => pb::IdleAction::Stay,
            IdleAction::Suspend => pb::IdleAction::Suspend,
            IdleAction::Delete => pb::IdleAction::Delete,
        } as i32,
    }
}

/// Validates an idle policy from a request (`None`: use `default`).
fn idle_from_pb(p: Option<&pb::IdlePolicy>, default: IdleRule) -> Result<IdleRule, BrokerError> {
    let Some(p) = p else { return Ok(default) };
    let action = match pb::IdleAction::try_from(p.action) {
        Ok(pb::IdleAction::Unspecified | pb::IdleAction::Stay) => IdleAction::Stay,
        Ok(pb::IdleAction::Delete) => IdleAction::Delete,
        Ok(pb::IdleAction::Suspend) => IdleAction::Suspend,
        Err(_) => {
            return Err(invalid(
                "idle.action",
                format!("unknown value {}", p.action),
            ))
        }
    };
    if action != IdleAction::Stay && p.idle_timeout_s == 0 {
        return Err(invalid(
            "idle.idle_timeout_s",
            "must be > 0 when an idle action is set",
        ));
    }
    Ok(IdleRule {
        timeout_s: p.idle_timeout_s,
        action,
    })
}

/// What a bubble answers to `attest`: its public keys and the REPORT_DATA
/// it asks the PSP to sign.
#[derive(Clone, Copy, Debug)]
pub struct GuestBinding {
    /// X25519 HPKE public key.
    pub kem_pk: [u8; 32],
    /// Ed25519 public key.
    pub sig_pk: [u8; 32],
    /// REPORT_DATA computed inside the bubble.
    pub report_data: [u8; 64],
    /// Digest of the loaded portions.
    pub portions_digest: [u8; 48],
    /// SHA-256 of the security policy (zero: default).
    pub policy_digest: [u8; 32],
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Validates a requested security policy (`None`: the default).
fn policy_from_pb(
    p: Option<&pb::SecurityPolicy>,
    max_payload: usize,
) -> Result<PortionPolicy, BrokerError> {
    let mut out = PortionPolicy::default();
    let Some(p) = p else { return Ok(out) };
    if p.fuel_per_call > 0 {
        out.fuel_per_call = p.fuel_per_call;
    }
    if p.memory_limit_bytes > 0 {
        if p.memory_limit_bytes > 64 << 20 {
            return Err(invalid("policy.memory_limit_bytes", "at most 64 MiB"));
        }
        out.memory_limit_bytes = p.memory_limit_bytes;
    }
    if p.call_deadline_ms > 0 {
        if u128::from(p.call_deadline_ms) > config::MAX_CALL_DEADLINE.as_millis() {
            return Err(invalid(
                "policy.call_deadline_ms",
                format!("at most {} ms", config::MAX_CALL_DEADLINE.as_millis()),
            ));
        }
        out.call_deadline_ms = p.call_deadline_ms;
    }
    if p.max_output_bytes > 0 {
        if p.max_output_bytes as usize > max_payload {
            return Err(invalid(
                "policy.max_output_bytes",
                format!("at most the payload limit of {max_payload} bytes"),
            ));
        }
        out.max_output_bytes = p.max_output_bytes;
    }
    if p.grants.len() > 16 {
        return Err(invalid("policy.grants", "at most 16 grants"));
    }
    for g in &p.grants {
        if !valid_name(&g.portion) {
            return Err(invalid(
                "policy.grants.portion",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if g.credentials.len() > 16 || !g.credentials.iter().all(|c| valid_name(c)) {
            return Err(invalid(
                "policy.grants.credentials",
                "at most 16 names of 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        out.grants.push((g.portion.clone(), g.credentials.clone()));
    }
    Ok(out)
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

/// A parent-supplied key-encryption key (empty: none).
fn parse_kek(b: &[u8]) -> Result<Option<bubble_keys::Kek>, BrokerError> {
    match b.len() {
        0 => Ok(None),
        32 => Ok(Some(
            bubble_keys::Kek::from_slice(b).map_err(|_| invalid("kek", "must be 32 bytes"))?,
        )),
        _ => Err(invalid("kek", "must be 32 bytes")),
    }
}

/// Whether a record holds resources (counts against quotas).
fn is_live(r: &BubbleRecord) -> bool {
    r.state.expects_vmm() || r.state == State::Suspended
}

/// Checks a bubble id's shape (`b-` + 32 lowercase hex digits).
fn validate_bubble_id(id: &str) -> Result<(), BrokerError> {
    let ok = id.len() == 34
        && id.starts_with("b-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "bubble_id",
            "must be 'b-' followed by 32 hex digits",
        ))
    }
}

fn validate_request_id(id: &str) -> Result<(), BrokerError> {
    if id.len() > 128 {
        return Err(invalid("client_request_id", "longer than 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
    {
        return Err(invalid(
            "client_request_id",
            "may only contain A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(())
}

fn validate_op(op: &str) -> Result<(), BrokerError> {
    if op.is_empty() || op.len() > 64 {
        return Err(invalid("op", "must be 1 to 64 characters"));
    }
    if !op
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid("op", "may only contain A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

impl Broker {
    /// Opens the registry in `cfg.data_dir`, reconciles it with the VMM
    /// processes that still run (see [`Broker::reconcile`]) and starts the
    /// warm-pool refillers and the idle-policy ticker.
    pub async fn open(cfg: BrokerConfig) -> Result<Arc<Self>, BrokerError> {
        raise_fd_limit();
        bubble_vmm::client::set_answer_poll(Duration::from_micros(u64::from(cfg.answer_poll_us)));
        std::fs::create_dir_all(cfg.data_dir.join("bubbles"))
            .map_err(|e| BrokerError::Spawn(format!("data dir {:?}: {e}", cfg.data_dir)))?;
        let registry = Registry::open(&cfg.registry_path())?;
        let records = registry
            .all()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let usage_signer = UsageSigner::load_or_create(&cfg.data_dir.join("usage-signing.key"))
            .map_err(BrokerError::Spawn)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let host_limit_mib =
            (config::host_memory_mib() as f64 * cfg.quota.host_overcommit_ratio) as u64;
        let psp = bubble_attestation::SimPsp::load_or_create(&cfg.data_dir.join("psp"))
            .map_err(|e| BrokerError::Spawn(e.to_string()))?;
        warn!("attestation backend: sim (virtual PSP; SIMULATED, no hardware protection)");
        let spawner = bubble_vmm::client::Spawner::new(
            cfg.vmm_program.clone(),
            cfg.vmm_args_prefix.clone(),
            cfg.data_dir.join("spares"),
            cfg.spare_vmms,
        );
        spawner.refill();
        // TLS for S3 uses rustls with the ring provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let frozen = match &cfg.store_url {
            Some(u) => crate::frozen::FrozenStore::s3(u)?,
            None => crate::frozen::FrozenStore::local(&cfg.store_dir)?,
        };
        let kek = bubble_keys::Kek::load_or_create(&cfg.data_dir.join("kek"))
            .map_err(|e| BrokerError::Store(format!("key-encryption key: {e}")))?;
        let broker = Arc::new(Self {
            frozen,
            kek,
            psp,
            closing: std::sync::atomic::AtomicBool::new(false),
            spawner,
            cfg,
            registry,
            records: Mutex::new(records),
            live: Mutex::new(HashMap::new()),
            events,
            metrics: Metrics::new(),
            pool_changed: Arc::new(tokio::sync::Notify::new()),
            dirty: Mutex::new(Default::default()),
            unsynced_owners: Mutex::new(Default::default()),
            owners_kick: Arc::new(tokio::sync::Notify::new()),
            owners_synced: tokio::sync::watch::channel(0).0,
            host_limit_mib,
            usage_signer,
        });
        broker.reconcile().await?;
        for p in broker.cfg.pools.clone() {
            tokio::spawn(Self::refill_loop(Arc::downgrade(&broker), p));
        }
        tokio::spawn(Self::maintenance_loop(Arc::downgrade(&broker)));
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

    /// Subscribes to all state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Makes the registry agree with reality after a (re)start: every bubble
    /// that should have a VMM is re-adopted if its VMM still answers on its
    /// socket, and marked FAILED with a reason otherwise.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), BrokerError> {
        let expected: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| {
                m.values()
                    .filter(|r| r.state.expects_vmm())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for rec in expected {
            let dir = self.cfg.bubble_dir(&rec.id);
            if rec.owner.is_empty() {
                // A pooled bubble may have been attached just before the
                // stop, its new owner not yet on disk: never pool it again.
                if let Ok((vmm, _)) = Vmm::adopt(&dir, &rec.id).await {
                    vmm.shutdown().await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                info!(bubble = %rec.id, profile = %rec.profile, "pooled bubble discarded after restart");
                self.transition(&rec.id, State::Deleted, "", |r| r.vmm_pid = 0)?;
                continue;
            }
            match Vmm::adopt(&dir, &rec.id).await {
                Ok((vmm, ready)) => {
                    let pid = vmm.pid();
                    info!(bubble = %rec.id, parent = %rec.owner, pid, "re-adopted running bubble");
                    let live = Arc::new(Live {
                        vmm,
                        call_lock: tokio::sync::Mutex::new(()),
                    });
                    self.live_insert(&rec.id, live.clone());
                    self.watch_vmm(rec.id.clone(), live);
                    if ready {
                        self.transition(&rec.id, State::Ready, "", |r| r.vmm_pid = pid)?;
                    } else {
                        self.fail(
                            &rec.id,
                            "bubble was still booting when the broker restarted",
                        );
                    }
                }
                Err(e) => {
                    warn!(bubble = %rec.id, parent = %rec.owner, error = %e, "bubble lost");
                    self.fail(
                        &rec.id,
                        &format!("VMM process not running after broker restart ({e})"),
                    );
                }
            }
        }
        self.stop_unrecorded().await;
        Ok(())
    }

    /// Stops VMMs that have no record: a crash between starting a bubble
    /// and recording it (the two overlap on the create path).
    async fn stop_unrecorded(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("bubbles")) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let known = self
                .records
                .lock()
                .map(|m| m.contains_key(&id))
                .unwrap_or(true);
            if known || validate_bubble_id(&id).is_err() {
                continue;
            }
            if let Ok((vmm, _)) = Vmm::adopt(&e.path(), &id).await {
                vmm.shutdown().await;
            }
            let _ = std::fs::remove_dir_all(e.path());
            warn!(bubble = %id, "stopped a VMM that was started but never recorded");
        }
    }

    fn live_insert(&self, id: &str, live: Arc<Live>) {
        if let Ok(mut m) = self.live.lock() {
            m.insert(id.to_string(), live);
        }
    }

    fn live_get(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok().and_then(|m| m.get(id).cloned())
    }

    fn live_remove(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok().and_then(|mut m| m.remove(id))
    }

    fn record(&self, id: &str) -> Option<BubbleRecord> {
        self.records.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// Returns the caller's record or the uniform not-accessible error.
    fn owned(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        validate_bubble_id(id)?;
        match self.record(id) {
            Some(r) if !r.owner.is_empty() && r.owner == parent => Ok(r),
            _ => Err(BrokerError::NotAccessible(id.to_string())),
        }
    }

    /// Changes a bubble's state, persists it (except BUSY, which is
    /// transient) and broadcasts the change.
    fn transition(
        &self,
        id: &str,
        state: State,
        reason: &str,
        update: impl FnOnce(&mut BubbleRecord),
    ) -> Result<BubbleRecord, BrokerError> {
        let now = now_ms();
        let (rec, changed, prev) = {
            let mut m = self
                .records
                .lock()
                .map_err(|_| BrokerError::Spawn("record table poisoned".into()))?;
            let Some(r) = m.get_mut(id) else {
                return Err(BrokerError::NotAccessible(id.to_string()));
            };
            // Terminal states stay terminal.
            if matches!(r.state, State::Deleted)
                || (r.state == State::Failed && state != State::Deleted)
            {
                return Ok(r.clone());
            }
            let prev = r.state;
            let changed = r.state != state;
            if changed && state == State::Ready && r.usage.running_since_ms == 0 {
                r.usage.running_since_ms = now;
            }
            if matches!(state, State::Failed | State::Deleted | State::Suspended) {
                r.usage.stop_running(r.memory_mib, now);
            }
            r.state = state;
            if state == State::Failed {
                r.failure_reason = reason.to_string();
            }
            update(r);
            (r.clone(), changed, prev)
        };
        // READY <-> BUSY flips with every call: kept in memory (and flushed
        // with the counters); every other change is persisted before it is
        // reported.
        let transient = matches!(
            (prev, state),
            (State::Ready | State::Busy, State::Ready | State::Busy)
        );
        if transient {
            if let Ok(mut d) = self.dirty.lock() {
                d.insert(id.to_string());
            }
        } else if prev == State::Booting && state == State::Ready {
            // Re-derived by reconciliation after a crash: no need to wait
            // for the disk on the create path.
            self.registry.put_lazy(&rec)?;
        } else {
            self.registry.put(&rec)?;
        }
        if changed {
            let _ = self.events.send(Event {
                owner: rec.owner.clone(),
                event: pb::BubbleEvent {
                    bubble_id: id.to_string(),
                    state: state_to_pb(state) as i32,
                    reason: reason.to_string(),
                    at_ms: now,
                },
            });
        }
        Ok(rec)
    }

    /// Marks a bubble FAILED and stops its VMM process if one runs.
    fn fail(self: &Arc<Self>, id: &str, reason: &str) {
        warn!(bubble = %id, reason, "bubble failed");
        self.metrics.failed(reason);
        if let Err(e) = self.transition(id, State::Failed, reason, |r| r.vmm_pid = 0) {
            warn!(bubble = %id, error = %e, "could not record failure");
        }
        if let Some(live) = self.live_remove(id) {
            tokio::spawn(async move { live.vmm.shutdown().await });
        }
        self.pool_changed.notify_waiters();
    }

    /// Follows a VMM's notices: a guest failure or a vanished process fails
    /// the bubble.
    fn watch_vmm(self: &Arc<Self>, id: String, live: Arc<Live>) {
        let broker = Arc::downgrade(self);
        let mut notices = live.vmm.notices();
        // The notices are about this VMM instance only: once the bubble has
        // another one (suspended and restored), an old VMM's exit or failure
        // must not fail the bubble.
        let instance = Arc::downgrade(&live);
        drop(live);
        tokio::spawn(async move {
            while let Some(n) = notices.recv().await {
                let Some(b) = broker.upgrade() else { return };
                let current = || {
                    b.live_get(&id)
                        .is_some_and(|l| std::ptr::eq(Arc::as_ptr(&l), instance.as_ptr()))
                };
                match n {
                    VmmNotice::Log(line) => {
                        info!(bubble = %id, guest_log = %line, "guest log");
                    }
                    VmmNotice::Failed(reason) => {
                        if current() {
                            b.fail(&id, &reason);
                        }
                        return;
                    }
                    VmmNotice::Gone(reason) => {
                        // Deleting or suspending a bubble also ends its
                        // process: not a failure.
                        if current() {
                            b.fail(&id, &reason);
                        }
                        return;
                    }
                }
            }
        });
    }

    /// Refuses a new bubble of `memory_mib` for `parent` (empty: the pool)
    /// if it would break a quota or host admission. Call with the record
    /// table locked so that concurrent creates cannot both pass.
    fn admit(
        &self,
        records: &HashMap<String, BubbleRecord>,
        parent: &str,
        memory_mib: u32,
    ) -> Result<(), BrokerError> {
        let q = &self.cfg.quota;
        let host: u64 = records
            .values()
            .filter(|r| is_live(r))
            .map(|r| u64::from(r.memory_mib))
            .sum();
        let want = u64::from(memory_mib);
        if !parent.is_empty() {
            self.admit_parent_only(records, parent, memory_mib)?;
        }
        if host + want > self.host_limit_mib {
            return Err(BrokerError::Quota(format!(
                "host admission: bubbles use {host} MiB; {want} MiB more exceeds {} MiB ({} x host RAM)",
                self.host_limit_mib, q.host_overcommit_ratio
            )));
        }
        Ok(())
    }

    /// Creates a bubble for `parent` and waits until it is READY or FAILED.
    pub async fn create(
        self: &Arc<Self>,
        parent: &str,
        req: pb::CreateBubbleRequest,
    ) -> Result<BubbleRecord, BrokerError> {
        let started = Instant::now();
        validate_request_id(&req.client_request_id)?;
        if !(config::MIN_MEMORY_MIB..=config::MAX_MEMORY_MIB).contains(&req.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be {}..={} MiB, got {}",
                    config::MIN_MEMORY_MIB,
                    config::MAX_MEMORY_MIB,
                    req.memory_mib
                ),
            ));
        }
        let vcpus = match req.vcpus {
            0 | 1 => 1,
            n => {
                return Err(invalid(
                    "vcpus",
                    format!("only 1 vCPU is supported, got {n}"),
                ))
            }
        };
        let image = ImageSpec::parse(&req.image, self.cfg.allow_test_images)
            .map_err(|reason| invalid("image", reason))?;
        let idle = idle_from_pb(req.idle.as_ref(), IdleRule::default())?;
        let policy = policy_from_pb(req.policy.as_ref(), self.cfg.max_payload)?;
        let mut rec = self.new_record(
            parent,
            &req.client_request_id,
            req.memory_mib,
            vcpus,
            &image,
            "",
            idle,
        );
        rec.policy = policy;
        let r = self.start(rec, image).await;
        self.metrics
            .create_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn new_record(
        &self,
        owner: &str,
        client_request_id: &str,
        memory_mib: u32,
        vcpus: u32,
        image: &ImageSpec,
        profile: &str,
        idle: IdleRule,
    ) -> BubbleRecord {
        BubbleRecord {
            id: format!("b-{}", uuid::Uuid::new_v4().simple()),
            owner: owner.to_string(),
            client_request_id: if client_request_id.is_empty() {
                uuid::Uuid::new_v4().simple().to_string()
            } else {
                client_request_id.to_string()
            },
            state: State::Booting,
            failure_reason: String::new(),
            memory_mib,
            vcpus,
            image: image.name(),
            created_at_ms: now_ms(),
            boot_us: 0,
            vmm_pid: 0,
            calls: 0,
            profile: profile.to_string(),
            idle,
            last_active_ms: now_ms(),
            usage: Default::default(),
            policy: PortionPolicy::default(),
            portions: Vec::new(),
            generation: 0,
            frozen: None,
        }
    }

    /// Admits, records and boots a new bubble (idempotent per owner and
    /// client request id).
    async fn start(
        self: &Arc<Self>,
        rec: BubbleRecord,
        image: ImageSpec,
    ) -> Result<BubbleRecord, BrokerError> {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BrokerError::Spawn("the broker is shutting down".into()));
        }
        if !rec.owner.is_empty() {
            if let Some(existing) = self.registry.request(&rec.owner, &rec.client_request_id)? {
                return self.await_settled(&existing).await;
            }
        }
        {
            let mut m = self
                .records
                .lock()
                .map_err(|_| BrokerError::Spawn("record table poisoned".into()))?;
            self.admit(&m, &rec.owner, rec.memory_mib)?;
            m.insert(rec.id.clone(), rec.clone());
        }
        // The record reaches the disk while the VMM starts and the guest
        // boots; the bubble is reported only once both are done. A crash in
        // between leaves a VMM without a record, which the next start
        // stops (see `reconcile`).
        let insert = {
            let b = self.clone();
            let r = rec.clone();
            tokio::task::spawn_blocking(move || b.registry.insert_new(&r))
        };
        let span =
            info_span!("create", bubble = %rec.id, parent = %rec.owner, profile = %rec.profile);
        self.boot(rec, image, insert).instrument(span).await
    }

    async fn await_settled(&self, id: &str) -> Result<BubbleRecord, BrokerError> {
        let deadline = Instant::now() + self.cfg.boot_timeout + Duration::from_secs(5);
        loop {
            let r = self
                .record(id)
                .ok_or_else(|| BrokerError::NotAccessible(id.to_string()))?;
            if r.state != State::Booting || Instant::now() > deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn boot(
        self: &Arc<Self>,
        rec: BubbleRecord,
        image: ImageSpec,
        insert: tokio::task::JoinHandle<
            Result<Option<BubbleRecord>, crate::registry::RegistryError>,
        >,
    ) -> Result<BubbleRecord, BrokerError> {
        let id = rec.id.clone();
        let _ = self.events.send(Event {
            owner: rec.owner.clone(),
            event: pb::BubbleEvent {
                bubble_id: id.clone(),
                state: pb::BubbleState::Booting as i32,
                reason: String::new(),
                at_ms: now_ms(),
            },
        });
        let dir = self.cfg.bubble_dir(&id);
        let t0 = Instant::now();
        let booting = async {
            let vmm = Vmm::spawn(&self.spawner, &self.cfg, &dir, &id, rec.memory_mib, &image)
                .await
                .map_err(|e| (true, format!("VMM did not start: {e}")))?;
            let live = Arc::new(Live {
                vmm,
                call_lock: tokio::sync::Mutex::new(()),
            });
            self.live_insert(&id, live.clone());
            let spawn_us = t0.elapsed().as_micros() as u64;
            let boot_us = live
                .vmm
                .wait_ready(self.cfg.boot_timeout)
                .await
                .map_err(|e| (false, e))?;
            Ok::<_, (bool, String)>((live, boot_us, spawn_us))
        };
        let (inserted, booted) = tokio::join!(insert, booting);
        let inserted = inserted
            .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))
            .and_then(|r| r.map_err(BrokerError::from));
        match inserted {
            Ok(None) => {}
            other => {
                // Not recorded (a concurrent retry won, or the disk failed):
                // this bubble never existed.
                if let Some(live) = self.live_remove(&id) {
                    live.vmm.shutdown().await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                if let Ok(mut m) = self.records.lock() {
                    m.remove(&id);
                }
                return match other {
                    Ok(Some(existing)) => self.await_settled(&existing.id).await,
                    Err(e) => Err(e),
                    Ok(None) => unreachable!("handled above"),
                };
            }
        }
        let (live, boot_us, spawn_us) = match booted {
            Ok(x) => x,
            Err((spawn_failed, reason)) => {
                self.fail(&id, &reason);
                if spawn_failed {
                    return Err(BrokerError::Spawn(reason));
                }
                return Ok(self.record(&id).unwrap_or(rec));
            }
        };
        let pid = live.vmm.pid();
        if rec.policy != PortionPolicy::default() {
            // Fix the security policy before anyone can load a portion.
            let set = live
                .vmm
                .call(
                    "set_policy",
                    &rec.policy.encode(),
                    config::DEFAULT_CALL_DEADLINE,
                )
                .await;
            if let Err(e) = set {
                let reason = format!("could not apply the security policy: {e:?}");
                self.fail(&id, &reason);
                return Ok(self.record(&id).unwrap_or(rec));
            }
        }
        self.watch_vmm(id.clone(), live);
        let r = self.transition(&id, State::Ready, "", |r| {
            r.boot_us = boot_us;
            r.vmm_pid = pid;
        })?;
        info!(
            boot_us,
            spawn_us,
            ready_us = t0.elapsed().as_micros() as u64,
            pid,
            "bubble ready"
        );
        if r.owner.is_empty() {
            self.pool_changed.notify_waiters();
        }
        Ok(r)
    }

    fn profile(&self, name: &str) -> Option<&PoolProfile> {
        self.cfg.pools.iter().find(|p| p.name == name)
    }

    /// Ready and booting pooled bubbles of a profile.
    fn pool_counts(&self, profile: &str) -> (usize, usize) {
        self.records
            .lock()
            .map(|m| {
                let pooled = m
                    .values()
                    .filter(|r| r.owner.is_empty() && r.profile == profile);
                let mut ready = 0;
                let mut booting = 0;
                for r in pooled {
                    match r.state {
                        State::Ready => ready += 1,
                        State::Booting => booting += 1,
                        _ => {}
                    }
                }
                (ready, booting)
            })
            .unwrap_or((0, 0))
    }

    /// Keeps one profile's pool at its size.
    async fn refill_loop(broker: std::sync::Weak<Self>, p: PoolProfile) {
        let image = match ImageSpec::parse(&p.image, true) {
            Ok(i) => i,
            Err(e) => {
                warn!(profile = %p.name, error = %e, "pool disabled: bad image");
                return;
            }
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(b) = broker.upgrade() else { return };
            if b.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let (ready, booting) = b.pool_counts(&p.name);
            if ready + booting < p.size as usize {
                let rec = b.new_record("", "", p.memory_mib, 1, &image, &p.name, p.idle_rule());
                match b.start(rec, image.clone()).await {
                    Ok(r) if r.state == State::Ready => backoff = Duration::from_millis(100),
                    Ok(r) => {
                        warn!(profile = %p.name, reason = %r.failure_reason, "pool bubble failed");
                        drop(b);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        warn!(profile = %p.name, error = %e, "pool refill refused");
                        drop(b);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                continue;
            }
            let notify = b.pool_changed.clone();
            drop(b);
            let notified = notify.notified();
            tokio::select! {
                _ = notified => {},
                _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            }
        }
    }

    /// Hands `parent` a READY bubble from a warm pool.
    pub async fn attach(
        self: &Arc<Self>,
        parent: &str,
        req: pb::AttachBubbleRequest,
    ) -> Result<BubbleRecord, BrokerError> {
        let started = Instant::now();
        validate_request_id(&req.client_request_id)?;
        let profile = self
            .profile(&req.profile)
            .cloned()
            .ok_or_else(|| invalid("profile", format!("no warm pool named {:?}", req.profile)))?;
        let idle = idle_from_pb(req.idle.as_ref(), profile.idle_rule())?;
        if !req.client_request_id.is_empty() {
            if let Some(existing) = self.request_in_memory(parent, &req.client_request_id) {
                return self.await_settled(&existing).await;
            }
            if let Some(existing) = self.registry.request(parent, &req.client_request_id)? {
                return self.await_settled(&existing).await;
            }
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.wait_ms));
        loop {
            let notified = self.pool_changed.notified();
            if let Some(r) = self.take_pooled(parent, &profile, idle, &req.client_request_id)? {
                // Refill in the background, after this answer has gone out:
                // booting the replacement competes for the same cores.
                let notify = self.pool_changed.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    notify.notify_waiters();
                });
                self.metrics
                    .attach_seconds
                    .observe(started.elapsed().as_secs_f64());
                info!(
                    bubble = %r.id,
                    parent = %parent,
                    profile = %profile.name,
                    us = started.elapsed().as_micros() as u64,
                    "attached from pool"
                );
                return Ok(r);
            }
            if Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
        // Miss: boot one for this parent.
        self.metrics.pool_misses.inc();
        let image = ImageSpec::parse(&profile.image, true).map_err(|e| invalid("profile", e))?;
        let mut rec = self.new_record(
            parent,
            &req.client_request_id,
            profile.memory_mib,
            1,
            &image,
            &profile.name,
            idle,
        );
        rec.profile = profile.name.clone();
        let r = self.start(rec, image).await;
        self.metrics
            .attach_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// Assigns the oldest READY pooled bubble of `profile` to `parent`.
    fn take_pooled(
        &self,
        parent: &str,
        profile: &PoolProfile,
        idle: IdleRule,
        client_request_id: &str,
    ) -> Result<Option<BubbleRecord>, BrokerError> {
        let rec = {
            let mut m = self
                .records
                .lock()
                .map_err(|_| BrokerError::Spawn("record table poisoned".into()))?;
            // A concurrent retry of the same attach already got one.
            if !client_request_id.is_empty() {
                if let Some(r) = by_request(&m, parent, client_request_id) {
                    return Ok(Some(r.clone()));
                }
            }
            let Some(id) = m
                .values()
                .filter(|r| {
                    r.owner.is_empty() && r.profile == profile.name && r.state == State::Ready
                })
                .min_by_key(|r| (r.created_at_ms, r.id.clone()))
                .map(|r| r.id.clone())
            else {
                return Ok(None);
            };
            // The pooled bubble already counts for the host; check the parent.
            self.admit_parent_only(&m, parent, profile.memory_mib)?;
            let Some(r) = m.get_mut(&id) else {
                return Ok(None);
            };
            r.owner = parent.to_string();
            r.client_request_id = if client_request_id.is_empty() {
                uuid::Uuid::new_v4().simple().to_string()
            } else {
                client_request_id.to_string()
            };
            r.idle = idle;
            r.last_active_ms = now_ms();
            r.clone()
        };
        // The new owner reaches the disk in the background (group commit),
        // off the attach path; until it has, every operation on the bubble
        // waits for it (see `owned_synced`). A crash before that leaves
        // the bubble recorded as pooled, and a restarted broker discards
        // pooled bubbles: it is never handed to another parent.
        if let Ok(mut u) = self.unsynced_owners.lock() {
            u.insert(rec.id.clone());
        }
        self.owners_kick.notify_one();
        Ok(Some(rec))
    }

    /// The bubble `parent` made with this request id, if the in-memory
    /// table has it (assignments not yet on disk included).
    fn request_in_memory(&self, parent: &str, client_request_id: &str) -> Option<String> {
        let m = self.records.lock().ok()?;
        by_request(&m, parent, client_request_id).map(|r| r.id.clone())
    }

    /// Writes pending pool assignments (owner and request id) in one
    /// durable transaction, as soon as there are any (group commit).
    async fn owner_flusher(me: std::sync::Weak<Self>, kick: Arc<tokio::sync::Notify>) {
        loop {
            // A kick while a flush runs leaves a permit: nothing is missed.
            let kicked = tokio::time::timeout(Duration::from_secs(1), kick.notified()).await;
            let Some(b) = me.upgrade() else { return };
            if kicked.is_err()
                && b.unsynced_owners
                    .lock()
                    .map(|u| u.is_empty())
                    .unwrap_or(true)
            {
                continue;
            }
            if let Err(e) = b.sync_owners_now().await {
                warn!(error = %e, "persisting attach assignments failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                kick.notify_one();
            }
        }
    }

    /// Persists every pending pool assignment now (durably), then wakes
    /// the operations waiting for them.
    pub async fn sync_owners_now(self: &Arc<Self>) -> Result<(), BrokerError> {
        let ids: Vec<String> = self
            .unsynced_owners
            .lock()
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return Ok(());
        }
        let recs: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| ids.iter().filter_map(|id| m.get(id).cloned()).collect())
            .unwrap_or_default();
        let b = self.clone();
        tokio::task::spawn_blocking(move || b.registry.assign_many(&recs))
            .await
            .map_err(|e| BrokerError::Spawn(format!("registry writer: {e}")))??;
        if let Ok(mut u) = self.unsynced_owners.lock() {
            for id in &ids {
                u.remove(id);
            }
        }
        self.owners_synced.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Like `owned`, and waits until the bubble's owner is on disk (a
    /// bubble attached from the pool a moment ago): nothing runs in a
    /// bubble whose ownership a crash could still undo.
    async fn owned_synced(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        let rec = self.owned(parent, id)?;
        let mut synced = self.owners_synced.subscribe();
        let deadline = tokio::time::Instant::now() + OWNER_SYNC_TIMEOUT;
        while self
            .unsynced_owners
            .lock()
            .map(|u| u.contains(id))
            .unwrap_or(false)
        {
            match tokio::time::timeout_at(deadline, synced.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(BrokerError::Unavailable(
                        "the bubble's owner could not be recorded on disk yet".into(),
                    ))
                }
            }
        }
        Ok(rec)
    }

    fn admit_parent_only(
        &self,
        records: &HashMap<String, BubbleRecord>,
        parent: &str,
        memory_mib: u32,
    ) -> Result<(), BrokerError> {
        let q = &self.cfg.quota;
        let mine: Vec<&BubbleRecord> = records
            .values()
            .filter(|r| is_live(r) && r.owner == parent)
            .collect();
        let count = mine.len() as u64;
        let mem: u64 = mine.iter().map(|r| u64::from(r.memory_mib)).sum();
        if count + 1 > u64::from(q.max_bubbles_per_parent) {
            return Err(BrokerError::Quota(format!(
                "parent {parent} has {count} of {} bubbles",
                q.max_bubbles_per_parent
            )));
        }
        if mem + u64::from(memory_mib) > q.max_memory_mib_per_parent {
            return Err(BrokerError::Quota(format!(
                "parent {parent} uses {mem} MiB; {memory_mib} MiB more exceeds its {} MiB",
                q.max_memory_mib_per_parent
            )));
        }
        Ok(())
    }

    /// Describes one of `parent`'s bubbles.
    pub fn describe(&self, parent: &str, id: &str) -> Result<BubbleRecord, BrokerError> {
        self.owned(parent, id)
    }

    /// Lists `parent`'s bubbles, oldest first.
    pub fn list(&self, parent: &str, include_deleted: bool) -> Vec<BubbleRecord> {
        let mut v: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| {
                m.values()
                    .filter(|r| r.owner == parent && (include_deleted || r.state != State::Deleted))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// Calls `op` in one of `parent`'s bubbles.
    pub async fn call(
        self: &Arc<Self>,
        parent: &str,
        req: pb::CallRequest,
    ) -> Result<pb::CallResponse, BrokerError> {
        let rec = self.owned_synced(parent, &req.bubble_id).await?;
        validate_op(&req.op)?;
        if req.input.len() > self.cfg.max_payload {
            return Err(invalid(
                "input",
                format!(
                    "{} bytes exceeds the payload limit of {} bytes",
                    req.input.len(),
                    self.cfg.max_payload
                ),
            ));
        }
        let deadline = match req.deadline_ms {
            0 => config::DEFAULT_CALL_DEADLINE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if deadline > config::MAX_CALL_DEADLINE {
            return Err(invalid(
                "deadline_ms",
                format!(
                    "at most {} ms, got {}",
                    config::MAX_CALL_DEADLINE.as_millis(),
                    req.deadline_ms
                ),
            ));
        }
        if !req.seal_to.is_empty() && req.seal_to.len() != 32 {
            return Err(invalid(
                "seal_to",
                "must be an X25519 public key of 32 bytes",
            ));
        }
        // A portion call runs function `op` of portion `portion`, under the
        // policy's deadline unless the caller asks for a shorter one.
        let (op, call_input, deadline) = if req.portion.is_empty() {
            (req.op.clone(), req.input.clone(), deadline)
        } else {
            if !valid_name(&req.portion) {
                return Err(invalid(
                    "portion",
                    "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                ));
            }
            let mut v = Vec::with_capacity(2 + req.portion.len() + req.op.len() + req.input.len());
            v.push(req.portion.len() as u8);
            v.extend(req.portion.as_bytes());
            v.push(req.op.len() as u8);
            v.extend(req.op.as_bytes());
            v.extend(&req.input);
            let cap = Duration::from_millis(u64::from(rec.policy.call_deadline_ms));
            let d = if req.deadline_ms == 0 {
                cap
            } else {
                deadline.min(cap)
            };
            ("portion".to_string(), v, d)
        };
        if !req.sign && req.seal_to.is_empty() {
            let (output, vmm_us) = self.invoke(rec, &op, &call_input, deadline).await?;
            return Ok(pb::CallResponse {
                output,
                vmm_us,
                ..Default::default()
            });
        }
        // Signed (and maybe sealed) inside the bubble: `sign:<op>` with
        // `[id][seal_to][input]`; the answer is
        // `[call_id u64][sealed u8][signature 64][output]`.
        let mut input = Vec::with_capacity(2 + rec.id.len() + 32 + call_input.len());
        input.push(rec.id.len() as u8);
        input.extend(rec.id.as_bytes());
        input.push(req.seal_to.len() as u8);
        input.extend(&req.seal_to);
        input.extend(&call_input);
        let op = format!("sign:{op}");
        let (raw, vmm_us) = self.invoke(rec, &op, &input, deadline).await?;
        if raw.len() < 73 {
            return Err(BrokerError::GuestRejected(
                "the bubble returned a malformed signed result".into(),
            ));
        }
        let mut call_id = [0u8; 8];
        call_id.copy_from_slice(&raw[..8]);
        Ok(pb::CallResponse {
            output: raw[73..].to_vec(),
            vmm_us,
            call_id: u64::from_le_bytes(call_id),
            signature: raw[9..73].to_vec(),
        })
    }

    /// Relays a sealed credential into one of `parent`'s bubbles.
    pub async fn provision(
        self: &Arc<Self>,
        parent: &str,
        req: pb::ProvisionCredentialRequest,
    ) -> Result<(), BrokerError> {
        let rec = self.owned_synced(parent, &req.bubble_id).await?;
        let name_ok = !req.name.is_empty()
            && req.name.len() <= 64
            && req
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(invalid(
                "name",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if req.sealed.is_empty() || req.sealed.len() > 64 * 1024 {
            return Err(invalid(
                "sealed",
                "must be a sealed box of 1 byte to 64 KiB",
            ));
        }
        let mut input = Vec::with_capacity(2 + rec.id.len() + req.name.len() + req.sealed.len());
        input.push(rec.id.len() as u8);
        input.extend(rec.id.as_bytes());
        input.push(req.name.len() as u8);
        input.extend(req.name.as_bytes());
        input.extend(&req.sealed);
        self.invoke(rec, "provision", &input, config::DEFAULT_CALL_DEADLINE)
            .await
            .map(|_| ())
    }

    /// Loads a WebAssembly portion into one of `parent`'s bubbles.
    pub async fn load_portion(
        self: &Arc<Self>,
        parent: &str,
        req: pb::LoadPortionRequest,
    ) -> Result<pb::LoadPortionResponse, BrokerError> {
        use sha2::Digest;
        let rec = self.owned_synced(parent, &req.bubble_id).await?;
        if !valid_name(&req.name) {
            return Err(invalid(
                "name",
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if req.module.is_empty() || req.module.len() + 66 > self.cfg.max_payload {
            return Err(invalid(
                "module",
                format!(
                    "must be 1 byte to the payload limit ({} bytes)",
                    self.cfg.max_payload
                ),
            ));
        }
        let mut input = Vec::with_capacity(1 + req.name.len() + req.module.len());
        input.push(req.name.len() as u8);
        input.extend(req.name.as_bytes());
        input.extend(&req.module);
        let id = rec.id.clone();
        let (digest, _) = self
            .invoke(rec, "load_portion", &input, config::DEFAULT_CALL_DEADLINE)
            .await?;
        if digest.len() != 48 {
            return Err(BrokerError::GuestRejected(
                "malformed portions digest".into(),
            ));
        }
        let module_sha384 = sha2::Sha384::digest(&req.module).to_vec();
        let hex: String = module_sha384.iter().map(|b| format!("{b:02x}")).collect();
        let name = req.name.clone();
        if let Ok(mut m) = self.records.lock() {
            if let Some(r) = m.get_mut(&id) {
                r.portions.push((name, hex));
                let _ = self.registry.put(r);
            }
        }
        info!(bubble = %id, parent = %parent, portion = %req.name, "portion loaded");
        Ok(pb::LoadPortionResponse {
            portions_digest: digest,
            module_sha384,
        })
    }

    /// Asks one of `parent`'s bubbles for its public keys and the
    /// REPORT_DATA binding `nonce` to them.
    pub async fn attest_binding(
        self: &Arc<Self>,
        parent: &str,
        bubble_id: &str,
        nonce: &[u8],
    ) -> Result<(BubbleRecord, GuestBinding), BrokerError> {
        let rec = self.owned_synced(parent, bubble_id).await?;
        if !(16..=64).contains(&nonce.len()) {
            return Err(invalid("nonce", "must be 16 to 64 bytes"));
        }
        let (out, _) = self
            .invoke(rec.clone(), "attest", nonce, config::DEFAULT_CALL_DEADLINE)
            .await?;
        if out.len() != 32 + 32 + 64 + 48 + 32 {
            return Err(BrokerError::GuestRejected(
                "the bubble returned a malformed attestation binding".into(),
            ));
        }
        let mut b = GuestBinding {
            kem_pk: [0; 32],
            sig_pk: [0; 32],
            report_data: [0; 64],
            portions_digest: [0; 48],
            policy_digest: [0; 32],
        };
        b.kem_pk.copy_from_slice(&out[..32]);
        b.sig_pk.copy_from_slice(&out[32..64]);
        b.report_data.copy_from_slice(&out[64..128]);
        b.portions_digest.copy_from_slice(&out[128..176]);
        b.policy_digest.copy_from_slice(&out[176..]);
        Ok((rec, b))
    }

    /// Freezes one of `parent`'s bubbles to the encrypted store.
    pub async fn suspend(
        self: &Arc<Self>,
        parent: &str,
        req: pb::SuspendBubbleRequest,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = self.owned_synced(parent, &req.bubble_id).await?;
        let parent_key = parse_kek(&req.kek)?;
        let id = rec.id.clone();
        let live = match (rec.state, self.live_get(&id)) {
            (State::Ready | State::Busy, Some(l)) => l,
            (state, _) => {
                return Err(BrokerError::WrongState {
                    id,
                    state: state_name(state),
                    detail: String::new(),
                })
            }
        };
        // No call runs while the VM is captured (it is at its safe point).
        let _guard = live.call_lock.lock().await;
        let snapshot = live
            .vmm
            .suspend()
            .await
            .map_err(|e| BrokerError::BubbleFailed(format!("snapshot: {e}")))?;
        let generation = rec.generation + 1;
        let header = crate::frozen::Header {
            bubble_id: id.clone(),
            owner: rec.owner.clone(),
            generation,
            memory_mib: rec.memory_mib,
            image: rec.image.clone(),
            total_len: 0,
            chunks: 0,
            page_runs: Vec::new(),
        };
        let kek = parent_key.as_ref().unwrap_or(&self.kek);
        // If storing fails (full disk, store down), the bubble keeps running.
        self.frozen
            .put(header, &snapshot, kek, parent_key.is_some())
            .await?;
        drop(snapshot);
        let vcpu_us = live.vmm.vcpu_us().await;
        self.live_remove(&id);
        live.vmm.shutdown().await;
        let r = self.transition(&id, State::Suspended, "", |r| {
            r.generation = generation;
            r.frozen = Some(crate::registry::FrozenRef {
                generation,
                parent_key: parent_key.is_some(),
            });
            r.vmm_pid = 0;
            if let Some(v) = vcpu_us {
                r.usage.vcpu_us = v;
            }
        })?;
        info!(bubble = %id, parent = %parent, generation, "bubble suspended");
        Ok(r)
    }

    /// Restores one of `parent`'s suspended bubbles: verifies its frozen
    /// copy completely, resumes it in a new VMM, and consumes the copy.
    pub async fn restore(
        self: &Arc<Self>,
        parent: &str,
        req: pb::RestoreBubbleRequest,
    ) -> Result<BubbleRecord, BrokerError> {
        let parent_key = parse_kek(&req.kek)?;
        validate_bubble_id(&req.bubble_id)?;
        let rec = match self.owned(parent, &req.bubble_id) {
            Ok(r) => r,
            Err(BrokerError::NotAccessible(_))
                if req.generation > 0 && self.record(&req.bubble_id).is_none() =>
            {
                self.import_frozen(parent, &req, parent_key.as_ref())
                    .await?
            }
            Err(e) => return Err(e),
        };
        let id = rec.id.clone();
        let frozen = match (rec.state, rec.frozen.clone()) {
            (State::Suspended, Some(f)) => f,
            (state, _) => {
                return Err(BrokerError::WrongState {
                    id,
                    state: state_name(state),
                    detail: ": only a SUSPENDED bubble can be restored".into(),
                })
            }
        };
        if frozen.parent_key && parent_key.is_none() {
            return Err(BrokerError::WrongKey);
        }
        let kek = parent_key.as_ref().unwrap_or(&self.kek);
        let t0 = Instant::now();
        let dir = self.cfg.bubble_dir(&id);
        let image = ImageSpec::parse(&rec.image, true).map_err(BrokerError::Spawn)?;
        // Fetch and verify the frozen copy while a VMM process starts and
        // creates the empty VM; it receives nothing unless all verifies.
        // Only the registry's current generation may run: an older copy
        // (rollback) or an already restored one is refused.
        let (header, cipher) = self.frozen.open(&id, frozen.generation, kek).await?;
        if header.owner != rec.owner || header.generation != rec.generation {
            return Err(BrokerError::DataLoss(
                "frozen copy does not match the registry (owner or generation)".into(),
            ));
        }
        let (fetched, spawned) = tokio::join!(
            async {
                let r = self
                    .frozen
                    .fetch(&id, frozen.generation, &header, cipher)
                    .await;
                (r, t0.elapsed())
            },
            async {
                let vmm =
                    Vmm::spawn_restore(&self.spawner, &self.cfg, &dir, &id, rec.memory_mib, &image)
                        .await?;
                // The sealed header's page runs: the VMM faults those pages
                // in (zeroes only) while the chunks are still verified, and
                // says where its guest memory is for the verified pages.
                let span = match vmm.prefault(&header.page_runs).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(bubble = %id, error = %e, "prefault refused; streaming the snapshot");
                        None
                    }
                };
                Ok::<_, String>((vmm, span))
            }
        );
        let (fetched, t_fetch) = fetched;
        let checked = fetched.and_then(|parts| {
            let first = parts.first().map(|p| p.expose()).unwrap_or_default();
            bubble_vmm::snapshot::parse_head(first, header.total_len as usize)
                .map_err(|e| BrokerError::DataLoss(format!("snapshot does not decode: {e}")))?;
            Ok(parts)
        });
        let (parts, (vmm, span)) = match (checked, spawned) {
            (Ok(x), Ok(vmm)) => (x, vmm),
            (Err(e), Ok((vmm, _))) => {
                vmm.shutdown().await;
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
            (Ok(_), Err(e)) => return Err(BrokerError::Spawn(e)),
        };
        let t_spawn = t0.elapsed();
        let slices: Vec<&[u8]> = parts.iter().map(|p| p.expose()).collect();
        let vmm_restore = match vmm.restore(&slices, span).await {
            Ok(d) => d,
            Err(e) => {
                vmm.shutdown().await;
                return Err(e);
            }
        };
        drop(slices);
        drop(parts);
        let t_vm = t0.elapsed();
        let pid = vmm.pid();
        let live = Arc::new(Live {
            vmm,
            call_lock: tokio::sync::Mutex::new(()),
        });
        self.live_insert(&id, live.clone());
        self.watch_vmm(id.clone(), live);
        // Consume the frozen copy: the same generation never runs twice.
        let r = self.transition(&id, State::Ready, "", |r| {
            r.frozen = None;
            r.vmm_pid = pid;
            r.last_active_ms = now_ms();
        })?;
        if let Err(e) = self
            .frozen
            .delete(&id, frozen.generation, header.chunks)
            .await
        {
            warn!(bubble = %id, error = %e, "could not delete the consumed frozen copy");
        }
        info!(
            bubble = %id,
            parent = %parent,
            generation = frozen.generation,
            fetch_us = t_fetch.as_micros() as u64,
            vmm_ready_us = t_spawn.as_micros() as u64,
            vm_us = (t_vm - t_spawn).as_micros() as u64,
            vmm_restore_us = vmm_restore.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "bubble restored"
        );
        Ok(r)
    }

    /// Takes over a bubble suspended by another broker sharing the store:
    /// the frozen copy must open with the given key and name the caller as
    /// its owner. Unknown ids and other owners get the uniform
    /// not-accessible error.
    async fn import_frozen(
        self: &Arc<Self>,
        parent: &str,
        req: &pb::RestoreBubbleRequest,
        parent_key: Option<&bubble_keys::Kek>,
    ) -> Result<BubbleRecord, BrokerError> {
        let kek = parent_key.unwrap_or(&self.kek);
        let not_accessible = || BrokerError::NotAccessible(req.bubble_id.clone());
        let (header, _) = match self.frozen.open(&req.bubble_id, req.generation, kek).await {
            Ok(x) => x,
            Err(BrokerError::DataLoss(m)) if m == "manifest missing" => {
                return Err(not_accessible())
            }
            Err(e) => return Err(e),
        };
        if header.owner != parent {
            return Err(not_accessible());
        }
        let image = ImageSpec::parse(&header.image, true).map_err(BrokerError::Spawn)?;
        let mut rec = self.new_record(
            parent,
            &format!("import:{}:{}", req.bubble_id, req.generation),
            header.memory_mib,
            1,
            &image,
            "",
            IdleRule::default(),
        );
        rec.id = req.bubble_id.clone();
        rec.state = State::Suspended;
        rec.generation = header.generation;
        rec.frozen = Some(crate::registry::FrozenRef {
            generation: header.generation,
            parent_key: parent_key.is_some(),
        });
        {
            let mut m = self
                .records
                .lock()
                .map_err(|_| BrokerError::Spawn("record table poisoned".into()))?;
            self.admit(&m, parent, rec.memory_mib)?;
            m.insert(rec.id.clone(), rec.clone());
        }
        self.registry.put(&rec)?;
        info!(bubble = %rec.id, parent = %parent, generation = rec.generation, "frozen bubble imported from the shared store");
        Ok(rec)
    }

    /// The launch measurement of a running bubble: the SNP launch digest
    /// its VMM computed over the pages it placed when it loaded the guest
    /// (for a restored bubble, the launch digest its snapshot carried). The
    /// broker does not compute it.
    pub async fn measurement(&self, bubble_id: &str) -> Result<[u8; 48], BrokerError> {
        let live = self
            .live_get(bubble_id)
            .ok_or_else(|| BrokerError::Unavailable("the bubble is not running".into()))?;
        live.vmm.launch_measurement().await
    }

    /// An attestation report of one of `parent`'s bubbles for `nonce`.
    pub async fn attestation(
        self: &Arc<Self>,
        parent: &str,
        bubble_id: &str,
        nonce: &[u8],
    ) -> Result<pb::Attestation, BrokerError> {
        use bubble_attestation::TeeBackend;
        let (rec, b) = self.attest_binding(parent, bubble_id, nonce).await?;
        let measurement = self.measurement(&rec.id).await?;
        let report = self
            .psp
            .report(&bubble_attestation::ReportRequest {
                report_data: b.report_data,
                measurement,
                host_data: bubble_attestation::host_data(&rec.id, &rec.owner),
            })
            .map_err(|e| BrokerError::GuestInternal(e.to_string()))?;
        let chain = self
            .psp
            .cert_chain()
            .map_err(|e| BrokerError::GuestInternal(e.to_string()))?;
        let portions = self
            .record(&rec.id)
            .map(|r| r.portions)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, h)| pb::PortionRef {
                name,
                module_sha384: hex::decode(h).unwrap_or_default(),
            })
            .collect();
        Ok(pb::Attestation {
            bubble_id: rec.id,
            report,
            tee: self.psp.name().to_string(),
            ark_der: chain.ark,
            ask_der: chain.ask,
            vcek_der: chain.vcek,
            kem_public_key: b.kem_pk.to_vec(),
            sig_public_key: b.sig_pk.to_vec(),
            portions_digest: b.portions_digest.to_vec(),
            policy_digest: b.policy_digest.to_vec(),
            portions,
        })
    }

    /// Runs `op` in a bubble whose ownership and request were checked.
    async fn invoke(
        self: &Arc<Self>,
        rec: BubbleRecord,
        op: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<(Vec<u8>, u64), BrokerError> {
        let started = Instant::now();
        let id = rec.id;
        let live = match (rec.state, self.live_get(&id)) {
            (State::Ready | State::Busy, Some(l)) => l,
            (state, _) => {
                let r = self.record(&id);
                return Err(BrokerError::WrongState {
                    id,
                    state: state_name(state),
                    detail: r
                        .filter(|r| !r.failure_reason.is_empty())
                        .map(|r| format!(": {}", r.failure_reason))
                        .unwrap_or_default(),
                });
            }
        };
        let _guard = live.call_lock.lock().await;
        self.transition(&id, State::Busy, "", |_| {})?;
        let vmm_started = Instant::now();
        let result = live.vmm.call(op, input, deadline).await;
        let vmm_us = vmm_started.elapsed().as_micros() as u64;
        let bytes_in = input.len() as u64;
        let count = |r: &mut BubbleRecord, out: u64| {
            r.calls += 1;
            r.usage.bytes_in += bytes_in;
            r.usage.bytes_out += out;
            r.last_active_ms = now_ms();
        };
        let r = match result {
            Ok(out) if out.len() > self.cfg.max_payload => {
                self.transition(&id, State::Ready, "", |r| count(r, 0))?;
                Err(BrokerError::OutputTooLarge(out.len(), self.cfg.max_payload))
            }
            Ok(out) => {
                let n = out.len() as u64;
                self.transition(&id, State::Ready, "", |r| count(r, n))?;
                Ok((out, vmm_us))
            }
            Err(CallFailure::Rejected(code, msg)) => {
                self.transition(&id, State::Ready, "", |r| count(r, 0))?;
                Err(BrokerError::from_guest(code, msg))
            }
            Err(CallFailure::Deadline(msg)) => {
                self.fail(&id, &format!("call deadline exceeded: {msg}"));
                Err(BrokerError::DeadlineExceeded(msg))
            }
            Err(CallFailure::Failed(msg)) => {
                self.fail(&id, &msg);
                Err(BrokerError::BubbleFailed(msg))
            }
        };
        self.metrics
            .call_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// Deletes one of `parent`'s bubbles: stops its VMM and removes its files.
    pub async fn delete(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
    ) -> Result<BubbleRecord, BrokerError> {
        let rec = self.owned(parent, id)?;
        self.destroy(&rec).await
    }

    /// Stops a bubble's VMM, removes its files and records it DELETED.
    async fn destroy(self: &Arc<Self>, rec: &BubbleRecord) -> Result<BubbleRecord, BrokerError> {
        let id = &rec.id;
        if rec.state == State::Deleted {
            return Ok(rec.clone());
        }
        let mut vcpu_us = None;
        if let Some(live) = self.live_remove(id) {
            // Wait for a running call to finish or fail first.
            let _guard = live.call_lock.lock().await;
            vcpu_us = live.vmm.vcpu_us().await;
            live.vmm.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(self.cfg.bubble_dir(id));
        info!(bubble = %id, parent = %rec.owner, "bubble deleted");
        let r = self.transition(id, State::Deleted, "", |r| {
            r.vmm_pid = 0;
            if let Some(v) = vcpu_us {
                r.usage.vcpu_us = v;
            }
        });
        self.pool_changed.notify_waiters();
        r
    }

    /// Usage of one of `parent`'s bubbles, signed by the broker.
    pub async fn usage(&self, parent: &str, id: &str) -> Result<pb::UsageReport, BrokerError> {
        let rec = self.owned(parent, id)?;
        let mut vcpu_us = rec.usage.vcpu_us;
        if let Some(live) = self.live_get(id) {
            if let Some(v) = live.vmm.vcpu_us().await {
                vcpu_us = v;
                if let Ok(mut m) = self.records.lock() {
                    if let Some(r) = m.get_mut(id) {
                        r.usage.vcpu_us = v;
                    }
                }
            }
        }
        let now = now_ms();
        let usage = pb::Usage {
            bubble_id: rec.id.clone(),
            owner: rec.owner.clone(),
            vcpu_us,
            memory_mib_seconds: rec.usage.memory_mib_seconds_at(rec.memory_mib, now),
            calls: rec.calls,
            bytes_in: rec.usage.bytes_in,
            bytes_out: rec.usage.bytes_out,
            from_ms: rec.created_at_ms,
            to_ms: now,
        };
        Ok(self.usage_signer.sign(usage))
    }

    /// Applies idle policies and flushes metering counters.
    async fn maintenance_loop(broker: std::sync::Weak<Self>) {
        let mut last_flush = Instant::now();
        loop {
            let interval = match broker.upgrade() {
                Some(b) => b.cfg.idle_check_interval,
                None => return,
            };
            tokio::time::sleep(interval).await;
            let Some(b) = broker.upgrade() else { return };
            let now = now_ms();
            let idle: Vec<BubbleRecord> = b
                .records
                .lock()
                .map(|m| {
                    m.values()
                        .filter(|r| {
                            !r.owner.is_empty()
                                && r.state == State::Ready
                                && r.idle.action != IdleAction::Stay
                                && r.idle.timeout_s > 0
                                && now.saturating_sub(r.last_active_ms)
                                    >= u64::from(r.idle.timeout_s) * 1000
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for r in idle {
                match r.idle.action {
                    IdleAction::Delete => {
                        info!(bubble = %r.id, parent = %r.owner, idle_s = r.idle.timeout_s, "idle: deleting");
                        if let Err(e) = b.destroy(&r).await {
                            warn!(bubble = %r.id, error = %e, "idle delete failed");
                        }
                    }
                    IdleAction::Suspend => {
                        info!(bubble = %r.id, parent = %r.owner, idle_s = r.idle.timeout_s, "idle: suspending");
                        let req = pb::SuspendBubbleRequest {
                            bubble_id: r.id.clone(),
                            kek: Vec::new(),
                        };
                        if let Err(e) = b.suspend(&r.owner, req).await {
                            warn!(bubble = %r.id, error = %e, "idle suspend failed");
                        }
                    }
                    IdleAction::Stay => {}
                }
            }
            if last_flush.elapsed() >= Duration::from_secs(5) {
                b.flush_counters();
                last_flush = Instant::now();
            }
        }
    }

    /// Persists records whose counters changed since the last flush.
    pub fn flush_counters(&self) {
        let ids: Vec<String> = self
            .dirty
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        let recs: Vec<BubbleRecord> = self
            .records
            .lock()
            .map(|m| ids.iter().filter_map(|id| m.get(id).cloned()).collect())
            .unwrap_or_default();
        if let Err(e) = self.registry.put_many(&recs) {
            warn!(error = %e, "flushing counters failed");
        }
    }

    /// Spare VMM processes ready, and how many are wanted.
    pub fn spares(&self) -> (usize, usize) {
        self.spawner.spares()
    }

    /// Updates the scrape-time gauges and renders all metrics.
    pub fn scrape(&self) -> String {
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        let mut pools: HashMap<String, i64> =
            self.cfg.pools.iter().map(|p| (p.name.clone(), 0)).collect();
        if let Ok(m) = self.records.lock() {
            for r in m.values() {
                *by_state.entry(state_name(r.state)).or_default() += 1;
                if r.owner.is_empty() && r.state == State::Ready {
                    *pools.entry(r.profile.clone()).or_default() += 1;
                }
            }
        }
        for s in ["BOOTING", "READY", "BUSY", "SUSPENDED", "FAILED", "DELETED"] {
            self.metrics
                .bubbles
                .get_or_create(&crate::metrics::StateLabel { state: s.into() })
                .set(by_state.get(s).copied().unwrap_or(0));
        }
        for (p, n) in pools {
            self.metrics
                .pool_depth
                .get_or_create(&crate::metrics::ProfileLabel { profile: p })
                .set(n);
        }
        self.metrics.encode()
    }

    /// Stops every VMM (used by tests and the demo; a production broker
    /// leaves them running so a restarted broker re-adopts them).
    pub async fn shutdown_all(self: &Arc<Self>) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Let creates already past admission register their VMMs.
        for _ in 0..200 {
            let booting = self
                .records
                .lock()
                .map(|m| m.values().any(|r| r.state == State::Booting))
                .unwrap_or(false);
            if !booting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.flush_counters();
        if let Err(e) = self.sync_owners_now().await {
            warn!(error = %e, "persisting attach assignments at shutdown failed");
        }
        let all: Vec<Arc<Live>> = self
            .live
            .lock()
            .map(|mut m| m.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for l in all {
            l.vmm.shutdown().await;
        }
    }
}

/// The gRPC face of a [`Broker`].
#[derive(Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::BubbleEvent, Status>> + Send>>;

#[tonic::async_trait]
impl BrokerApi for BrokerService {
    async fn create_bubble(
        &self,
        request: Request<pb::CreateBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self.broker.create(&parent, request.into_inner()).await?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn describe_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self
            .broker
            .describe(&parent, &request.get_ref().bubble_id)?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn list_bubbles(
        &self,
        request: Request<pb::ListBubblesRequest>,
    ) -> Result<Response<pb::ListBubblesResponse>, Status> {
        let parent = parent_of(&request)?;
        let bubbles = self
            .broker
            .list(&parent, request.get_ref().include_deleted)
            .iter()
            .map(to_pb)
            .collect();
        Ok(Response::new(pb::ListBubblesResponse { bubbles }))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("call", bubble = %req.bubble_id, parent = %parent, op = %req.op);
        let r = self.broker.call(&parent, req).instrument(span).await?;
        Ok(Response::new(r))
    }

    async fn delete_bubble(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self
            .broker
            .delete(&parent, &request.get_ref().bubble_id)
            .await?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn attach_bubble(
        &self,
        request: Request<pb::AttachBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let rec = self.broker.attach(&parent, request.into_inner()).await?;
        Ok(Response::new(to_pb(&rec)))
    }

    async fn get_usage(
        &self,
        request: Request<pb::BubbleRef>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let parent = parent_of(&request)?;
        let r = self
            .broker
            .usage(&parent, &request.get_ref().bubble_id)
            .await?;
        Ok(Response::new(r))
    }

    async fn get_attestation(
        &self,
        request: Request<pb::GetAttestationRequest>,
    ) -> Result<Response<pb::Attestation>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("attest", bubble = %req.bubble_id, parent = %parent);
        let a = self
            .broker
            .attestation(&parent, &req.bubble_id, &req.nonce)
            .instrument(span)
            .await?;
        Ok(Response::new(a))
    }

    async fn provision_credential(
        &self,
        request: Request<pb::ProvisionCredentialRequest>,
    ) -> Result<Response<pb::ProvisionCredentialResponse>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("provision", bubble = %req.bubble_id, parent = %parent, credential = %req.name);
        self.broker.provision(&parent, req).instrument(span).await?;
        Ok(Response::new(pb::ProvisionCredentialResponse {}))
    }

    async fn load_portion(
        &self,
        request: Request<pb::LoadPortionRequest>,
    ) -> Result<Response<pb::LoadPortionResponse>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("load_portion", bubble = %req.bubble_id, parent = %parent, portion = %req.name);
        let r = self
            .broker
            .load_portion(&parent, req)
            .instrument(span)
            .await?;
        Ok(Response::new(r))
    }

    async fn suspend_bubble(
        &self,
        request: Request<pb::SuspendBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("suspend", bubble = %req.bubble_id, parent = %parent);
        let r = self.broker.suspend(&parent, req).instrument(span).await?;
        Ok(Response::new(to_pb(&r)))
    }

    async fn restore_bubble(
        &self,
        request: Request<pb::RestoreBubbleRequest>,
    ) -> Result<Response<pb::Bubble>, Status> {
        let parent = parent_of(&request)?;
        let req = request.into_inner();
        let span = info_span!("restore", bubble = %req.bubble_id, parent = %parent);
        let r = self.broker.restore(&parent, req).instrument(span).await?;
        Ok(Response::new(to_pb(&r)))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let parent = parent_of(&request)?;
        let only = request.into_inner().bubble_id;
        if !only.is_empty() {
            self.broker.owned(&parent, &only)?;
        }
        let rx = self.broker.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| match ev {
                Ok(ev) if ev.owner == parent && (only.is_empty() || ev.event.bubble_id == only) => {
                    Some(Ok(ev.event))
                }
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::data_loss(format!(
                        "watcher too slow: {n} events dropped; re-list and watch again"
                    ))))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_ops_are_validated() {
        assert!(validate_bubble_id("b-0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "b-",
            "b-0123456789ABCDEF0123456789abcdef",
            "x-0123456789abcdef0123456789abcdef",
            "b-0123456789abcdef0123456789abcdef0",
        ] {
            assert!(validate_bubble_id(bad).is_err(), "{bad}");
        }
        assert!(validate_op("sha256").is_ok());
        assert!(validate_op("").is_err());
        assert!(validate_op("a b").is_err());
        assert!(validate_op(&"x".repeat(65)).is_err());
        assert!(validate_request_id("").is_ok());
        assert!(validate_request_id("retry-1:a.b_c").is_ok());
        assert!(validate_request_id("no spaces").is_err());
        assert!(validate_request_id(&"k".repeat(129)).is_err());
    }

    #[test]
    fn errors_map_to_status_codes() {
        let s: Status = invalid("memory_mib", "too big").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("memory_mib:"));
        let s: Status = BrokerError::NotAccessible("b-x".into()).into();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }
}
