//! `bubble-bench`: measures bubbled against raw KVM floors in one run.
//!
//! ```text
//! cargo run --release -p bubble-bench -- [--json FILE] [--only METRIC...]
//! ```
//!
//! Floors (no broker): `raw_kvm_floor` (create VM + vCPU + memory, enter a
//! minimal CPL-3 guest, until its first exit) and `raw_exit_rtt` (one CPL-3
//! exit round trip, averaged over batches, 10,000 exits in all). Through the
//! broker (gRPC over its Unix socket): `create_to_ready` (cold
//! CreateBubble until READY) and `call_echo_64b` (Call round trip, 64-byte
//! echo). Prints p50/p99 and the ratios to the floors; `--json` writes an
//! object keyed by metric with `p50_us`, `p99_us` and `n`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bubble_proto::v1 as pb;
use bubbled::config::BrokerConfig;
use bubbled::demo::percentile;
use bubbled::service::Broker;
use bubbled::{client, server};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "bubble-bench")]
struct Opts {
    /// Write results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these metrics (default: all).
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Samples for create_to_ready.
    #[arg(long, default_value_t = 40)]
    creates: usize,
    /// Samples for call_echo_64b.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
}

/// One metric's samples summarized.
struct Stat {
    p50: Duration,
    p99: Duration,
    n: usize,
    extra: BTreeMap<String, Value>,
}

fn stat(mut v: Vec<Duration>) -> Stat {
    v.sort();
    Stat {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        n: v.len(),
        extra: BTreeMap::new(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

const ALL: &[&str] = &[
    "raw_kvm_floor",
    "raw_exit_rtt",
    "create_to_ready",
    "call_echo_64b",
];

fn main() -> anyhow::Result<()> {
    bubbled::vmm_entry_if_requested();
    let opts = Opts::parse();
    for m in &opts.only {
        anyhow::ensure!(
            ALL.contains(&m.as_str()),
            "unknown metric {m:?}; known: {ALL:?}"
        );
    }
    let want = |m: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == m);
    let mut results: BTreeMap<&str, Stat> = BTreeMap::new();

    if want("raw_kvm_floor") {
        // Warm up the page cache and KVM module paths first.
        for _ in 0..5 {
            bubble_vmm::floor::raw_kvm_floor()?;
        }
        let mut v = Vec::new();
        for _ in 0..100 {
            v.push(bubble_vmm::floor::raw_kvm_floor()?);
        }
        results.insert("raw_kvm_floor", stat(v));
    }
    if want("raw_exit_rtt") {
        // 20 batches of 500 exits: 10,000 exits; each sample is a batch mean.
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(bubble_vmm::floor::raw_exit_rtt(500)?);
        }
        let mut s = stat(v);
        s.extra.insert("exits".into(), json!(10_000));
        results.insert("raw_exit_rtt", s);
    }
    if want("create_to_ready") || want("call_echo_64b") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(through_broker(&opts, &want, &mut results))?;
    }

    print_results(&results);
    if let Some(path) = &opts.json {
        let mut obj = serde_json::Map::new();
        for (k, s) in &results {
            let mut m = serde_json::Map::new();
            m.insert("p50_us".into(), json!(round(us(s.p50))));
            m.insert("p99_us".into(), json!(round(us(s.p99))));
            m.insert("n".into(), json!(s.n));
            for (ek, ev) in &s.extra {
                m.insert(ek.clone(), ev.clone());
            }
            obj.insert(k.to_string(), Value::Object(m));
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(obj))? + "\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

async fn through_broker(
    opts: &Opts,
    want: &dyn Fn(&str) -> bool,
    results: &mut BTreeMap<&'static str, Stat>,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("bubble-bench-").tempdir()?;
    let cfg = BrokerConfig::new(dir.path().to_path_buf())?;
    let broker = Broker::open(cfg).await?;
    let sock = dir.path().join("bubbled.sock");
    let listener = server::bind_unix(&sock)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve_unix(broker.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    let mut c = client::connect_unix(&sock).await?;
    let create = pb::CreateBubbleRequest {
        idle: None,
        policy: None,
        client_request_id: String::new(),
        memory_mib: 64,
        vcpus: 1,
        image: String::new(),
    };
    if want("create_to_ready") {
        let mut v = Vec::new();
        for _ in 0..opts.creates {
            let t = Instant::now();
            let b = c.create_bubble(create.clone()).await?.into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(
                b.state == pb::BubbleState::Ready as i32,
                "{}",
                b.failure_reason
            );
            c.delete_bubble(pb::BubbleRef {
                bubble_id: b.bubble_id,
            })
            .await?;
        }
        results.insert("create_to_ready", stat(v));
    }
    if want("call_echo_64b") {
        let b = c.create_bubble(create.clone()).await?.into_inner();
        let req = pb::CallRequest {
            bubble_id: b.bubble_id.clone(),
            op: "echo".into(),
            input: vec![0xa5; 64],
            deadline_ms: 0,
            ..Default::default()
        };
        for _ in 0..200 {
            c.call(req.clone()).await?;
        }
        let mut v = Vec::with_capacity(opts.calls);
        for _ in 0..opts.calls {
            let t = Instant::now();
            let r = c.call(req.clone()).await?.into_inner();
            v.push(t.elapsed());
            anyhow::ensure!(r.output.len() == 64);
        }
        results.insert("call_echo_64b", stat(v));
        c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    let _ = stop_tx.send(());
    let _ = srv.await;
    broker.shutdown_all().await;
    Ok(())
}

fn print_results(results: &BTreeMap<&str, Stat>) {
    println!(
        "{:<18} {:>7} {:>11} {:>11}  ratio",
        "metric", "n", "p50 (µs)", "p99 (µs)"
    );
    let floor = results.get("raw_kvm_floor").map(|s| s.p50);
    let rtt = results.get("raw_exit_rtt").map(|s| s.p50);
    for (k, s) in results {
        let ratio = match (*k, floor, rtt) {
            ("create_to_ready", Some(f), _) => format!(
                "{:.2} × raw_kvm_floor (target ≤ 3)",
                s.p50.as_secs_f64() / f.as_secs_f64()
            ),
            ("call_echo_64b", _, Some(r)) => {
                format!("raw_exit_rtt + {:.1} µs (target ≤ +150)", us(s.p50) - us(r))
            }
            _ => String::new(),
        };
        println!(
            "{:<18} {:>7} {:>11.1} {:>11.1}  {}",
            k,
            s.n,
            us(s.p50),
            us(s.p99),
            ratio
        );
    }
}
