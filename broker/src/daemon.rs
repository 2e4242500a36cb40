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
    /// Serve Prometheus /metrics and /healthz on this TCP address.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
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
    let mut cfg = BrokerConfig::new(data_dir.clone()).context("locating own binary")?;
    cfg.max_payload = opts
        .max_payload
        .or(file.max_payload)
        .unwrap_or(DEFAULT_MAX_PAYLOAD);
    cfg.allow_test_images = opts.allow_test_images;
    if let Some(q) = file.quota.clone() {
        cfg.quota = q;
    }
    cfg.pools = file.pools.clone();
    cfg.admins = file.admins.clone();
    if let Some(n) = file.spare_vmms {
        cfg.spare_vmms = n;
    }
    if let Some(j) = file.jail.clone() {
        cfg.jail = j;
    }
    if let Some(s) = file.record_retention_s {
        cfg.record_retention = std::time::Duration::from_secs(s);
    }
    if let Some(ms) = file.claim_lease_ms {
        cfg.claim_lease = std::time::Duration::from_millis(ms.max(300));
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
            server::serve_tls(b, listener, &files, s)
                .await
                .map_err(anyhow::Error::from)
        });
        info!(addr = %local, pki = %pki.display(), "serving with mutual TLS");
        tls_addr = Some(local);
    }
    let mut admin_addr = None;
    if let Some(addr) = opts.admin_listen.or(file.admin_listen) {
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
    println!("{ready}");
    tokio::select! {
        _ = shutdown_signal() => info!("shutting down"),
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
