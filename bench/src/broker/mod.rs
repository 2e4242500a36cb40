//! The metrics measured through a broker running in this process (gRPC
//! over its Unix socket), one module per group.

mod accounting;
mod awaits;
mod calls;
mod density;
mod events;
mod freeze;
mod helpers;
mod load;
mod nats;
mod probes;
mod refusal;
mod tokenize;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bubble_proto::v1 as pb;
use bubbled::client;
use bubbled::config::BrokerConfig;
use bubbled::core::Broker;

use crate::stats::Stat;
use crate::Opts;

/// The results of a run, by metric.
pub(crate) type Results = BTreeMap<&'static str, Stat>;

/// What every metric through the broker works with.
pub(crate) struct Ctx {
    /// The parent's connection.
    pub(crate) c: client::Client,
    /// The broker itself (scrapes, pool depth).
    pub(crate) broker: Arc<Broker>,
    /// The broker's Unix socket (for more parents).
    pub(crate) sock: PathBuf,
    /// The broker's runtime.
    pub(crate) bh: tokio::runtime::Handle,
    /// The broker's data directory.
    pub(crate) dir: PathBuf,
    /// A 64 MiB bubble of the default image.
    pub(crate) create: pb::CreateBubbleRequest,
}

/// The metrics that need a broker.
pub(crate) const THROUGH_BROKER: &[&str] = &[
    "get_attestation",
    "call_tokenize",
    "call_tokenize_sealed",
    "tokenize_4_parents",
    "attach_warm",
    "attach_warm_policy",
    "attach_warm_policy_cold",
    "density_1000",
    "suspend_64m",
    "restore_64m",
    "suspend_512m",
    "restore_512m",
    "restore_refusal",
    "create_to_ready",
    "create_then_attest",
    "call_echo_64b",
    "load_8_parents",
    "health_probe_cost",
    "event_to_start",
    "event_to_result",
    "events_per_sec",
    "event_to_start_nats",
    "events_per_sec_nats",
    "await_resume",
    "security_accounting",
];

/// Starts a broker in a temporary directory and measures the wanted
/// metrics through it.
pub(crate) async fn through_broker(
    opts: &Opts,
    want: &dyn Fn(&str) -> bool,
    results: &mut Results,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("bubble-bench-").tempdir()?;
    let mut cfg = BrokerConfig::new(dir.path().to_path_buf())?;
    if let Some(p) = &opts.vmm_program {
        anyhow::ensure!(p.exists(), "--vmm-program {}: no such file", p.display());
        cfg.vmm_program = p.clone();
    }
    cfg.quota.max_bubbles_per_parent = 2000;
    cfg.quota.max_memory_mib_per_parent = 1 << 20;
    cfg.restore_over_socket = opts.restore_over_socket;
    cfg.pools = vec![bubbled::config::PoolProfile {
        name: "warm".into(),
        memory_mib: 16,
        size: if want("health_probe_cost") {
            probes::POOL as u32
        } else if want("attach_warm") || want("attach_warm_policy_cold") {
            4
        } else {
            0
        },
        image: "shim".into(),
        idle_timeout_s: 0,
        idle_action: Default::default(),
        policy: None,
    }];
    if want("attach_warm_policy") {
        // The payments policy installed ahead of need by the refiller.
        cfg.pools.push(bubbled::config::PoolProfile {
            name: calls::PAY_POOL.into(),
            memory_mib: 16,
            size: 4,
            image: "shim".into(),
            idle_timeout_s: 0,
            idle_action: Default::default(),
            policy: Some(calls::pay_pool_policy()),
        });
    }
    // NATS metrics run against a nats-server of their own (killed with
    // the bench); it must be installed.
    let nats = if want("event_to_start_nats") || want("events_per_sec_nats") {
        let n = nats::NatsServer::start(dir.path())?;
        cfg.events.nats_url = Some(n.url.clone());
        Some(n)
    } else {
        None
    };
    let answer_poll_us = cfg.answer_poll_us;
    let embedded = bubbled::demo::EmbeddedBroker::start(cfg).await?;
    let mut x = Ctx {
        c: client::connect_unix(&embedded.socket).await?,
        broker: embedded.broker.clone(),
        sock: embedded.socket.clone(),
        bh: embedded.handle(),
        dir: dir.path().to_path_buf(),
        create: pb::CreateBubbleRequest {
            idle: None,
            policy: None,
            client_request_id: String::new(),
            memory_mib: 64,
            vcpus: 1,
            image: String::new(),
        },
    };
    if want("create_to_ready") {
        let s = calls::create_to_ready(&mut x, opts.creates, want("attach_warm")).await?;
        results.insert("create_to_ready", s);
    }
    if want("create_then_attest") {
        let s = calls::create_then_attest(&mut x, opts.creates).await?;
        results.insert("create_then_attest", s);
    }
    if want("call_echo_64b") {
        let s = calls::call_echo_64b(&mut x, opts.calls, answer_poll_us).await?;
        results.insert("call_echo_64b", s);
    }
    if want("get_attestation") {
        results.insert("get_attestation", calls::get_attestation(&mut x).await?);
    }
    if want("call_tokenize") || want("call_tokenize_sealed") || want("tokenize_4_parents") {
        tokenize::run(&mut x, want, opts.calls, results).await?;
    }
    if want("attach_warm") {
        results.insert("attach_warm", calls::attach_warm(&mut x).await?);
    }
    if want("attach_warm_policy") {
        let s = calls::attach_warm_policy(&mut x).await?;
        results.insert("attach_warm_policy", s);
    }
    if want("attach_warm_policy_cold") {
        let s = calls::attach_warm_policy_cold(&mut x).await?;
        results.insert("attach_warm_policy_cold", s);
    }
    freeze::suspend_restore(&mut x, want, opts, results).await?;
    if want("restore_refusal") {
        results.insert("restore_refusal", refusal::restore_refusal(&mut x).await?);
    }
    if want("await_resume") {
        results.insert("await_resume", awaits::await_resume(&mut x, 30).await?);
    }
    if want("density_1000") {
        results.insert("density_1000", density::density_1000(&mut x).await?);
    }
    if want("health_probe_cost") {
        let s = probes::health_probe_cost(&mut x).await?;
        results.insert("health_probe_cost", s);
    }
    if want("event_to_start") {
        let s = events::event_to_start(&mut x, opts.calls.min(2000), "embedded").await?;
        results.insert("event_to_start", s);
    }
    if want("event_to_start_nats") {
        let s = events::event_to_start(&mut x, opts.calls.min(2000), "nats").await?;
        results.insert("event_to_start_nats", s);
    }
    if want("event_to_result") {
        let s = events::event_to_result(&mut x, opts.calls.min(2000)).await?;
        results.insert("event_to_result", s);
    }
    if want("events_per_sec") {
        results.insert(
            "events_per_sec",
            events::events_per_sec(&mut x, 4000, "embedded").await?,
        );
    }
    if want("events_per_sec_nats") {
        results.insert(
            "events_per_sec_nats",
            events::events_per_sec(&mut x, 4000, "nats").await?,
        );
    }
    if want("security_accounting") {
        let s = accounting::security_accounting(&mut x).await?;
        results.insert("security_accounting", s);
    }
    if want("load_8_parents") {
        results.insert("load_8_parents", load::load_8_parents(&x).await?);
    }
    let stopped = embedded.stop().await;
    drop(nats);
    stopped
}
