//! Broker configuration and request limits.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::store::registry::{IdleAction, IdleRule};

/// Smallest guest memory a bubble may have, MiB.
pub const MIN_MEMORY_MIB: u32 = 4;
/// Largest guest memory a bubble may have, MiB.
pub const MAX_MEMORY_MIB: u32 = 4096;
/// Default maximum call payload (input or output), bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Default per-call deadline when the caller gives none.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Largest per-call deadline a caller may ask for.
pub const MAX_CALL_DEADLINE: Duration = Duration::from_secs(300);
/// How long a cold create may take before the bubble is failed.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// How the broker runs.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Directory holding the registry, per-bubble directories and PKI.
    pub data_dir: PathBuf,
    /// Maximum call payload in bytes (input and output).
    pub max_payload: usize,
    /// Whether `test:<kind>` guest images (hostile guests) may be created.
    pub allow_test_images: bool,
    /// Program spawned as a bubble's VMM process.
    pub vmm_program: PathBuf,
    /// Arguments placed before the VMM's own arguments (e.g. `__vmm`).
    pub vmm_args_prefix: Vec<String>,
    /// Time allowed from spawn to READY.
    pub boot_timeout: Duration,
    /// Per-parent and host-wide limits.
    pub quota: Quota,
    /// Warm pools.
    pub pools: Vec<PoolProfile>,
    /// How often idle policies are checked and counters flushed.
    pub idle_check_interval: Duration,
    /// VMM processes kept started ahead of need (they create their VM only
    /// when given a bubble).
    pub spare_vmms: usize,
    /// How long a VMM polls for the next request before it sleeps (0:
    /// never poll). Polling spends CPU to avoid thread wake-ups, which
    /// cost tens of µs on nested hosts.
    pub vmm_poll_us: u32,
    /// How long a call polls for its VMM's answer before the broker's
    /// thread sleeps (0: never). Only when no other call is in flight and
    /// the bubble answered its last call within this budget.
    pub answer_poll_us: u32,
    /// Directory of the frozen-bubble store (shared by brokers that may
    /// restore each other's bubbles).
    pub store_dir: PathBuf,
    /// An S3-compatible store instead (`s3://bucket/prefix?endpoint=...`).
    pub store_url: Option<String>,
    /// How VMM processes are jailed (see `docs/jail.md`).
    pub jail: JailConfig,
    /// How long FAILED and DELETED records stay visible (describe, list
    /// with deleted, idempotent retries) before they are collected.
    pub record_retention: Duration,
    /// How long a claim on a frozen copy lasts without renewal; a broker
    /// that holds one renews it every third of this while it works.
    pub claim_lease: Duration,
    /// Restores send the snapshot over the VMM's socket, never writing
    /// guest memory directly (as on a host that refuses it): for tests
    /// and measurements of that path.
    pub restore_over_socket: bool,
    /// Parent ids (`uid:0`, `cert:ops`) that may list every parent's
    /// bubbles.
    pub admins: Vec<String>,
    /// Event-driven portions (`[events]`).
    pub events: EventsConfig,
    /// Strike and throttle thresholds (`[security]`).
    pub security: SecurityConfig,
    /// Start a new audit log although the registry pins a checkpoint of
    /// an earlier one (`--audit-new-log`; only when the log file is
    /// missing or empty; the new log's first record says so).
    pub audit_new_log: bool,
}

/// The `[events]` section: the embedded queue of triggers' events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// How long a dispatcher may hold an event unacked before it is handed
    /// out again (a crashed broker's events come back after this), ms.
    pub ack_wait_ms: u64,
    /// Delay before a failed event is tried again, ms.
    pub retry_delay_ms: u64,
    /// Rate matching: a pool trigger runs enough bubbles (up to its
    /// `max_concurrency` and the parent's quota) to work through its
    /// backlog within this, ms.
    pub target_latency_ms: u64,
    /// NATS JetStream server for triggers with source `nats`
    /// (`nats://host:port`; none: such triggers are refused).
    pub nats_url: Option<String>,
    /// Most events one trigger may have pending (published, not yet
    /// processed) on the embedded queue: a trigger's default and ceiling.
    pub max_pending: u64,
    /// How long an ended await stays in the shared index (where a late
    /// event with its key is told it ended) before a sweeper collects
    /// it, ms.
    pub await_retention_ms: u64,
    /// Most live awaits one parent may have frozen by this broker; one
    /// more is refused with RESOURCE_EXHAUSTED.
    pub max_awaits_per_owner: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            ack_wait_ms: 30_000,
            retry_delay_ms: 200,
            target_latency_ms: 1000,
            nats_url: None,
            max_pending: 10_000,
            await_retention_ms: 600_000,
            max_awaits_per_owner: 1000,
        }
    }
}

/// The `[security]` section: when a module is quarantined and a parent
/// throttled (see `core::strikes` and `docs/audit.md`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Security events of one kind caused by one module in one parent's
    /// bubbles that quarantine it for that parent…
    pub strikes: usize,
    /// …within this many seconds.
    pub strike_window_s: u64,
    /// Refusals of one kind (foreign id, foreign attestation, wrong
    /// restore key) by one parent that throttle it…
    pub probe_strikes: usize,
    /// …within this many seconds.
    pub probe_window_s: u64,
    /// How long a throttled parent is refused, seconds.
    pub throttle_s: u64,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            strikes: 3,
            strike_window_s: 60,
            probe_strikes: 10,
            probe_window_s: 60,
            throttle_s: 60,
        }
    }
}

impl SecurityConfig {
    /// Refuses thresholds that would quarantine or throttle on nothing
    /// (0 strikes) or never forget (a 0 s window).
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("strikes", self.strikes as u64),
            ("strike_window_s", self.strike_window_s),
            ("probe_strikes", self.probe_strikes as u64),
            ("probe_window_s", self.probe_window_s),
            ("throttle_s", self.throttle_s),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(format!("[security] {name} must be at least 1")),
            None => Ok(()),
        }
    }
}

/// Default [`BrokerConfig::record_retention`]: one day.
pub const DEFAULT_RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The `[jail]` section: how VMM processes are confined.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// VMMs die with the broker (`PR_SET_PDEATHSIG`) instead of running on
    /// to be re-adopted by a restarted broker. Spares always die with it.
    pub die_with_broker: bool,
    /// New mount, pid, net, ipc and uts namespaces, an empty root and (as
    /// root) a uid per VMM. Off only for debugging.
    pub namespaces: bool,
    /// Take the unprivileged path (a user namespace mapping one id) even
    /// when the broker is root; a root broker first gives the VMM an id
    /// from `uid_range`, so the path runs as it would for a broker of
    /// that uid. Always taken when the broker is not root.
    pub userns: bool,
    /// Ids given one per live VMM when the broker is root, `"LO-HI"`.
    pub uid_range: String,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            die_with_broker: false,
            namespaces: true,
            userns: false,
            uid_range: "200000-265535".into(),
        }
    }
}

impl JailConfig {
    /// `uid_range` as numbers (both ends included, none of them 0).
    pub fn uid_range(&self) -> Result<(u32, u32), String> {
        let bad = || {
            format!(
                "[jail] uid_range {:?}: want \"LO-HI\", 0 < LO <= HI",
                self.uid_range
            )
        };
        let (lo, hi) = self.uid_range.split_once('-').ok_or_else(bad)?;
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }
}

/// Per-parent quotas and host admission control.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// Most live bubbles one parent may have.
    pub max_bubbles_per_parent: u32,
    /// Most guest memory (MiB) one parent's live bubbles may total.
    pub max_memory_mib_per_parent: u64,
    /// Bubble memory (including pools) may total at most this ratio of the
    /// host's RAM; guest memory is reserved lazily, so > 1 overcommits.
    pub host_overcommit_ratio: f64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_bubbles_per_parent: 256,
            max_memory_mib_per_parent: 64 * 1024,
            host_overcommit_ratio: 4.0,
        }
    }
}

/// A warm pool: pre-booted READY bubbles of one shape, without an owner.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolProfile {
    /// Profile name used by AttachBubble.
    pub name: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Number of READY bubbles to keep.
    pub size: u32,
    /// Guest image.
    #[serde(default = "default_image")]
    pub image: String,
    /// Default idle policy of bubbles handed out from this pool.
    #[serde(default)]
    pub idle_timeout_s: u32,
    /// Idle action (`stay`, `suspend`, `delete`).
    #[serde(default)]
    pub idle_action: IdleActionName,
    /// The security policy every bubble of this pool is booted with
    /// (installed by the refiller before the bubble is offered). An attach
    /// takes from the pool only when it asks for exactly this policy (same
    /// canonical bytes); absent: the default policy, and an attach with
    /// another policy installs its own in a pooled bubble.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
}

/// A security policy written in the configuration (a pool profile's): the
/// keys of `bubblectl`'s policy file; 0 or absent means the broker's
/// default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Wasm fuel per portion call.
    #[serde(default)]
    pub fuel_per_call: u64,
    /// A portion's linear memory limit, bytes.
    #[serde(default)]
    pub memory_limit_bytes: u32,
    /// Wall-clock deadline per portion call, ms.
    #[serde(default)]
    pub call_deadline_ms: u32,
    /// Largest output, bytes.
    #[serde(default)]
    pub max_output_bytes: u32,
    /// Credential grants, in order (the order is part of the policy's
    /// bytes and so of its digest).
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
    /// Uses per second and burst of each credential (absent: no limit).
    #[serde(default)]
    pub credential_rate: Option<RateConfig>,
}

/// One grant of a [`PolicyConfig`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// The portion name.
    pub portion: String,
    /// Credentials it may use.
    #[serde(default)]
    pub credentials: Vec<String>,
}

/// A credential rate of a [`PolicyConfig`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Uses per second.
    pub per_sec: u32,
    /// Burst.
    pub burst: u32,
}

fn default_image() -> String {
    "shim".into()
}

/// Idle action as written in the config file.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdleActionName {
    /// Keep the bubble.
    #[default]
    Stay,
    /// Suspend it.
    Suspend,
    /// Delete it.
    Delete,
}

impl PoolProfile {
    /// The profile's default idle rule.
    pub fn idle_rule(&self) -> IdleRule {
        IdleRule {
            timeout_s: self.idle_timeout_s,
            action: match self.idle_action {
                IdleActionName::Stay => IdleAction::Stay,
                IdleActionName::Suspend => IdleAction::Suspend,
                IdleActionName::Delete => IdleAction::Delete,
            },
        }
    }
}

/// The TOML configuration file of `bubbled` (every key optional; flags
/// given on the command line win).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// mTLS listen address.
    pub tls_listen: Option<std::net::SocketAddr>,
    /// Admin (metrics) listen address.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Allow the admin endpoint on a non-loopback address (it is
    /// unauthenticated and its `/metrics` names every parent).
    #[serde(default)]
    pub admin_listen_public: bool,
    /// PKI directory.
    pub pki: Option<PathBuf>,
    /// Maximum call payload, bytes.
    pub max_payload: Option<usize>,
    /// Quotas.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Warm pools.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolProfile>,
    /// VMM processes kept started ahead of need.
    pub spare_vmms: Option<usize>,
    /// VMM request polling before sleeping, µs (0: off).
    pub vmm_poll_us: Option<u32>,
    /// How long a guest may take to start, ms (default 20000, at least
    /// 100).
    pub boot_timeout_ms: Option<u64>,
    /// Answer polling in the broker, µs (0: off).
    pub answer_poll_us: Option<u32>,
    /// Frozen-bubble store directory.
    pub store: Option<PathBuf>,
    /// VMM jail.
    #[serde(default)]
    pub jail: Option<JailConfig>,
    /// Seconds FAILED and DELETED records are kept before collection.
    pub record_retention_s: Option<u64>,
    /// Milliseconds a claim on a frozen copy lasts without renewal
    /// (default 30000, at least 300).
    pub claim_lease_ms: Option<u64>,
    /// Restore over the VMM's socket only (see `Config`).
    #[serde(default)]
    pub restore_over_socket: bool,
    /// Parent ids with the operator's view across parents.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Strike and throttle thresholds.
    #[serde(default)]
    pub security: Option<SecurityConfig>,
    /// Open connections one uid may hold on the Unix socket.
    pub max_connections_per_uid: Option<usize>,
    /// Milliseconds a new Unix-socket connection has to send its first
    /// bytes.
    pub handshake_timeout_ms: Option<u64>,
    /// Event-driven portions.
    #[serde(default)]
    pub events: Option<EventsConfig>,
    /// Milliseconds a connection (Unix socket or mutual TLS) may stay with
    /// no request open before it is closed; 0: never. Default 300000.
    pub idle_timeout_ms: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg: FileConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(s) = &cfg.security {
            s.check()?;
        }
        for p in &cfg.pools {
            if p.name.is_empty() || p.name.len() > 64 {
                return Err(format!("pool name {:?}: must be 1-64 characters", p.name));
            }
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&p.memory_mib) {
                return Err(format!(
                    "pool {}: memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    p.name
                ));
            }
        }
        Ok(cfg)
    }
}

/// Total RAM of this host in MiB (from /proc/meminfo).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

impl BrokerConfig {
    /// A configuration rooted at `data_dir` whose VMM is this very program
    /// re-executed with `__vmm` (see [`crate::vmm_entry_if_requested`]).
    pub fn new(data_dir: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            allow_test_images: false,
            vmm_program: std::env::current_exe()?,
            vmm_args_prefix: vec![crate::VMM_SUBCOMMAND.to_string()],
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            quota: Quota::default(),
            pools: Vec::new(),
            idle_check_interval: Duration::from_secs(1),
            spare_vmms: 2,
            vmm_poll_us: 300,
            answer_poll_us: 100,
            store_dir: data_dir.join("store"),
            store_url: None,
            jail: JailConfig::default(),
            record_retention: DEFAULT_RECORD_RETENTION,
            claim_lease: crate::store::frozen::DEFAULT_LEASE,
            restore_over_socket: false,
            admins: Vec::new(),
            events: EventsConfig::default(),
            security: SecurityConfig::default(),
            audit_new_log: false,
            data_dir,
        })
    }

    /// Path of the registry database.
    pub fn registry_path(&self) -> PathBuf {
        self.data_dir.join("registry.redb")
    }

    /// Path of the embedded event queue.
    pub fn events_path(&self) -> PathBuf {
        self.data_dir.join("events.redb")
    }

    /// Path of the audit log (in its own 0700 directory).
    pub fn audit_path(&self) -> PathBuf {
        self.data_dir.join("audit").join("audit.log")
    }

    /// Directory of one bubble's runtime files (socket, log).
    pub fn bubble_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("bubbles").join(id)
    }
}
