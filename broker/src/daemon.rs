//! The `bubbled` daemon: argument parsing, logging, listeners, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info};

use crate::config::{BrokerConfig, FileConfig, DEFAULT_MAX_PAYLOAD};
use crate::core::Broker;
use crate::server::{self, TlsFiles};

/// Command-line options of `bubbled`.
#[derive(Debug, Parser)]
#[command(
    name = "bubbled",
    version,
    about = "Broker for bubbles: small child KVM VMs that only their parent can talk to"
)]
pub struct Opts {
    /// TOML configuration file (flags win over it).
    #[arg(long, env = "BUBBLED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (registry, bubble runtime files, PKI)
    /// [default: /var/lib/bubbled].
    #[arg(long, env = "BUBBLED_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Unix socket to serve on [default: DATA_DIR/bubbled.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also serve gRPC with mutual TLS on this TCP address (e.g. 127.0.0.1:7443).
    #[arg(long)]
    pub tls_listen: Option<SocketAddr>,
    /// Serve Prometheus /metrics and /healthz on this TCP address. It is
    /// unauthenticated and `/metrics` names every parent, so it must be a
    /// loopback address unless --admin-listen-public is given.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Allow --admin-listen on a non-loopback address (anyone who reaches
    /// it reads every parent's name and counts).
    #[arg(long)]
    pub admin_listen_public: bool,
    /// PKI directory made by `bubblectl pki init` [default: DATA_DIR/pki].
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Maximum call payload in bytes [default: 1 MiB].
    #[arg(long)]
    pub max_payload: Option<usize>,
    /// Allow `test:<kind>` (hostile) guest images; for tests only.
    #[arg(long)]
    pub allow_test_images: bool,
    /// Stop every bubble when the broker exits (default: leave them running
    /// so that a restarted broker re-adopts them).
    #[arg(long)]
    pub stop_bubbles_on_exit: bool,
    /// Start a new audit log although the registry pins a checkpoint of
    /// an earlier one (after moving a damaged log aside). Only when
    /// DATA_DIR/audit/audit.log is missing or empty; the new log's first
    /// record names the checkpoint it replaces.
    #[arg(long)]
    pub audit_new_log: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Frozen-bubble store: a directory [default: DATA_DIR/store] or
    /// `s3://BUCKET/PREFIX?endpoint=URL` (credentials from AWS_* variables);
    /// brokers sharing it can restore each other's bubbles.
    #[arg(long)]
    pub store: Option<PathBuf>,
}

/// Sets up `tracing` on stderr (`RUST_LOG` filters, default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: never in a file or a
    // journal, and never when NO_COLOR is set.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Entry point of the `bubbled` binary.
pub fn main() -> ExitCode {
    let opts = Opts::parse();
    init_logging(opts.log_json);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bubbled: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = crate::ctl::errors::one_line(&e);
            error!("{msg}");
            eprintln!("bubbled: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first polled, so that a signal sent as soon as
/// the ready line is out is not taken by the default action (death).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => std::future::pending().await,
        }
    }
}

/// Runs the broker until SIGTERM or SIGINT.
pub async fn run(opts: Opts) -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        anyhow::bail!("/dev/kvm is missing: bubbled needs KVM to run bubbles");
    }
    let file = match &opts.config {
        Some(p) => FileConfig::load(p).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    let data_dir = opts
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/bubbled"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    // Refused before anything starts.
    let admin_listen = opts.admin_listen.or(file.admin_listen);
    if let Some(addr) = admin_listen {
        if !(addr.ip().is_loopback() || opts.admin_listen_public || file.admin_listen_public) {
            anyhow::bail!(
                "admin endpoint {addr} is not a loopback address: it is unauthenticated and \
             its /metrics names every parent; bind it to 127.0.0.1 or ::1, or pass \
             --admin-listen-public (admin_listen_public = true) to expose it anyway"
            );
        }
    }
    let mut cfg = BrokerConfig::new(data_dir.clone()).context("locating own binary")?;
    cfg.max_payload = opts
        .max_payload
        .or(file.max_payload)
        .unwrap_or(DEFAULT_MAX_PAYLOAD);
    cfg.allow_test_images = opts.allow_test_images;
    cfg.audit_new_log = opts.audit_new_log;
    if let Some(q) = file.quota.clone() {
        cfg.quota = q;
    }
    cfg.pools = file.pools.clone();
    cfg.admins = file.admins.clone();
    if let Some(s) = file.security.clone() {
        cfg.security = s;
    }
    if let Some(n) = file.spare_vmms {
        cfg.spare_vmms = n;
    }
    if let Some(j) = file.jail.clone() {
        cfg.jail = j;
    }
    if let Some(e) = file.events.clone() {
        cfg.events = e;
    }
    if let Some(s) = file.record_retention_s {
        cfg.record_retention = std::time::Duration::from_secs(s);
    }
    if let Some(ms) = file.claim_lease_ms {
        cfg.claim_lease = std::time::Duration::from_millis(ms.max(300));
    }
    cfg.restore_over_socket = file.restore_over_socket;
    if let Some(ms) = file.boot_timeout_ms {
        cfg.boot_timeout = std::time::Duration::from_millis(ms.max(100));
    }
    if let Some(n) = file.vmm_poll_us {
        cfg.vmm_poll_us = n.min(10_000);
    }
    if let Some(n) = file.answer_poll_us {
        cfg.answer_poll_us = n.min(1_000);
    }
    if let Some(s) = opts.store.clone().or(file.store.clone()) {
        let text = s.to_string_lossy().into_owned();
        if text.starts_with("s3://") {
            cfg.store_url = Some(text);
        } else {
            cfg.store_dir = s;
        }
    }
    crate::datadir::make_private(&data_dir, &cfg.store_dir)
        .with_context(|| format!("making data dir {} private", data_dir.display()))?;
    let broker = Broker::open(cfg).await.context("opening the registry")?;
    let socket = opts
        .socket
        .clone()
        .or(file.socket.clone())
        .unwrap_or_else(|| data_dir.join("bubbled.sock"));
    let unix = server::bind_unix(&socket)?;
    // Removed however this function ends, so that a failed start leaves no
    // socket behind.
    let _socket_file = server::SocketFile(socket.clone());
    let limits = crate::conn_limit::ConnLimits {
        per_uid: file
            .max_connections_per_uid
            .unwrap_or(crate::conn_limit::DEFAULT_PER_UID)
            .max(1),
        handshake: file
            .handshake_timeout_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(crate::conn_limit::DEFAULT_HANDSHAKE),
        idle: match file.idle_timeout_ms {
            None => Some(crate::idle::DEFAULT_IDLE),
            Some(0) => None,
            Some(ms) => Some(std::time::Duration::from_millis(ms)),
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    {
        let b = broker.clone();
        let s = stop(stop_rx.clone());
        tasks.spawn(async move {
            server::serve_unix_with(b, unix, limits, s)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    info!(socket = %socket.display(), "serving on Unix socket");
    let mut tls_addr = None;
    if let Some(addr) = opts.tls_listen.or(file.tls_listen) {
        let pki = opts
            .pki
            .clone()
            .or(file.pki.clone())
            .unwrap_or_else(|| data_dir.join("pki"));
        let files = TlsFiles::in_pki_dir(&pki);
        let listener = server::bind_tcp(addr).await?;
        let local = listener.local_addr()?;
        let b = broker.clone();
        let s = stop(stop_rx.clone());
        tasks.spawn(async move {
            server::serve_tls(b, listener, &files, limits.idle, s)
                .await
                .map_err(anyhow::Error::from)
        });
        info!(addr = %local, pki = %pki.display(), "serving with mutual TLS");
        tls_addr = Some(local);
    }
    let mut admin_addr = None;
    if let Some(addr) = admin_listen {
        let listener = server::bind_tcp(addr).await?;
        admin_addr = Some(listener.local_addr()?);
        let b = broker.clone();
        let s = stop(stop_rx.clone());
        tasks.spawn(async move {
            crate::admin::serve(b, listener, s)
                .await
                .map_err(anyhow::Error::from)
        });
        info!(addr = ?admin_addr, "serving /metrics and /healthz");
    }
    // Tell whoever started us (tests, the demo) that we are serving.
    let mut ready = format!("bubbled ready socket={}", socket.display());
    if let Some(a) = tls_addr {
        ready.push_str(&format!(" tls={a}"));
    }
    if let Some(a) = admin_addr {
        ready.push_str(&format!(" admin={a}"));
    }
    let stop_signal = shutdown_signal();
    println!("{ready}");
    tokio::select! {
        _ = stop_signal => info!("shutting down"),
        Some(r) = tasks.join_next() => {
            r.context("listener task")??;
        }
    }
    // Stop accepting; the servers finish the calls in flight before they
    // return (graceful shutdown).
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    broker.flush_counters();
    if let Err(e) = broker.sync_owners_now().await {
        tracing::warn!(error = %e, "persisting attach assignments at shutdown failed");
    }
    info!("all in-flight requests finished");
    if let Err(e) = broker.audit_log().checkpoint() {
        tracing::warn!(error = %e, "audit log: final checkpoint failed");
    }
    if opts.stop_bubbles_on_exit {
        broker.shutdown_all().await;
    }
    Ok(())
}
