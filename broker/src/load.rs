//! `bubblectl load`: a bounded, self-stopping load generator for a broker
//! on this machine.
//!
//! Each of N parents (mutual TLS, one certificate each) runs a fixed number
//! of churn rounds (create or attach, a few calls, delete) while one steady
//! bubble per parent takes calls in parallel. The run stops by itself after
//! the configured counts and reports throughput, latency percentiles and
//! errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use serde_json::json;

use crate::client::{self, Client};
use crate::demo::percentile;

/// Load parameters.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Broker URL (https://localhost:PORT).
    pub endpoint: String,
    /// PKI directory (its CA signs throw-away certificates `load-<i>`,
    /// kept in a temporary directory).
    pub pki: PathBuf,
    /// Number of parents.
    pub parents: usize,
    /// Churn rounds per parent.
    pub rounds: usize,
    /// Calls per churn round.
    pub calls_per_round: usize,
    /// Steady calls per parent (on one long-lived bubble).
    pub steady_calls: usize,
    /// Attach from this warm-pool profile instead of creating.
    pub profile: Option<String>,
    /// Guest memory of created bubbles, MiB.
    pub memory_mib: u32,
}

/// Results of a load run.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Latencies by operation.
    pub latencies: BTreeMap<&'static str, Vec<Duration>>,
    /// Error messages by operation.
    pub errors: BTreeMap<&'static str, Vec<String>>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Total number of errors.
    pub fn error_count(&self) -> usize {
        self.errors.values().map(Vec::len).sum()
    }

    /// Total number of operations.
    pub fn op_count(&self) -> usize {
        self.latencies.values().map(Vec::len).sum::<usize>() + self.error_count()
    }

    /// JSON summary.
    pub fn to_json(&self) -> serde_json::Value {
        let mut ops = serde_json::Map::new();
        for (k, v) in &self.latencies {
            let mut v = v.clone();
            v.sort();
            let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
            ops.insert(
                k.to_string(),
                json!({"n": v.len(), "p50_us": us(percentile(&v, 50.0)), "p99_us": us(percentile(&v, 99.0)), "p999_us": us(percentile(&v, 99.9))}),
            );
        }
        json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ops": self.op_count(),
            "ops_per_sec": self.op_count() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "errors": self.error_count(),
            "error_samples": self.errors.iter().map(|(k, v)| (k.to_string(), json!(v.iter().take(3).collect::<Vec<_>>()))).collect::<serde_json::Map<_,_>>(),
            "by_op": ops,
        })
    }

    /// Human-readable summary.
    pub fn print(&self) {
        println!(
            "{} ops in {:.2} s: {:.1} ops/s, {} errors",
            self.op_count(),
            self.elapsed.as_secs_f64(),
            self.op_count() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.error_count()
        );
        println!(
            "{:<10} {:>7} {:>11} {:>11} {:>11}",
            "op", "n", "p50 (µs)", "p99 (µs)", "p999 (µs)"
        );
        for (k, v) in &self.latencies {
            let mut v = v.clone();
            v.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "{:<10} {:>7} {:>11.1} {:>11.1} {:>11.1}",
                k,
                v.len(),
                us(percentile(&v, 50.0)),
                us(percentile(&v, 99.0)),
                us(percentile(&v, 99.9))
            );
        }
        for (k, v) in &self.errors {
            println!("errors in {k}: {} (first: {})", v.len(), v[0]);
        }
    }
}

type Shared = Arc<Mutex<LoadReport>>;

async fn timed<T>(
    rep: &Shared,
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Option<T> {
    let t = Instant::now();
    let r = f.await;
    let d = t.elapsed();
    let mut g = rep.lock();
    match r {
        Ok(v) => {
            g.latencies.entry(op).or_default().push(d);
            Some(v)
        }
        Err(e) => {
            g.errors
                .entry(op)
                .or_default()
                .push(format!("{:?}: {}", e.code(), e.message()));
            None
        }
    }
}

async fn new_bubble(c: &mut Client, spec: &LoadSpec, rep: &Shared) -> Option<pb::Bubble> {
    match &spec.profile {
        Some(p) => {
            let req = pb::AttachBubbleRequest {
                profile: p.clone(),
                wait_ms: 0,
                idle: None,
                client_request_id: String::new(),
                policy: None,
            };
            timed(rep, "attach", async {
                c.attach_bubble(req).await.map(|r| r.into_inner())
            })
            .await
        }
        None => {
            let req = pb::CreateBubbleRequest {
                idle: None,
                policy: None,
                client_request_id: String::new(),
                memory_mib: spec.memory_mib,
                vcpus: 1,
                image: String::new(),
            };
            timed(rep, "create", async {
                c.create_bubble(req).await.map(|r| r.into_inner())
            })
            .await
        }
    }
}

async fn call(c: &mut Client, id: &str, rep: &Shared, op: &'static str) {
    let req = pb::CallRequest {
        bubble_id: id.to_string(),
        op: "echo".into(),
        input: vec![0x42; 64],
        deadline_ms: 0,
        ..Default::default()
    };
    let out = timed(rep, op, async { c.call(req).await.map(|r| r.into_inner()) }).await;
    if let Some(o) = out {
        if o.output != [0x42; 64] {
            rep.lock()
                .errors
                .entry(op)
                .or_default()
                .push("echo returned other bytes".into());
        }
    }
}

async fn delete(c: &mut Client, id: String, rep: &Shared) {
    timed(rep, "delete", async {
        c.delete_bubble(pb::BubbleRef { bubble_id: id })
            .await
            .map(|_| ())
    })
    .await;
}

/// Runs the load and returns its report.
pub async fn run(spec: LoadSpec) -> Result<LoadReport, String> {
    let mut clients = Vec::new();
    // Throw-away parent certificates, signed by the PKI's CA but written to
    // a temporary directory (removed when the run ends), never to the PKI.
    let certs = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    for i in 0..spec.parents {
        let name = format!("load-{i}");
        crate::pki::issue_parent(&spec.pki, certs.path(), &name, false, None)
            .map_err(|e| e.to_string())?;
        let (cert, key) = crate::pki::parent_files(certs.path(), &name);
        let c = client::connect_tls(&spec.endpoint, &spec.pki.join("ca.pem"), &cert, &key)
            .await
            .map_err(|e| e.to_string())?;
        clients.push(c);
    }
    let rep: Shared = Arc::new(Mutex::new(LoadReport::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        // Churn.
        let (spec1, rep1, mut c1) = (spec.clone(), rep.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..spec1.rounds {
                if let Some(b) = new_bubble(&mut c1, &spec1, &rep1).await {
                    for _ in 0..spec1.calls_per_round {
                        call(&mut c1, &b.bubble_id, &rep1, "call").await;
                    }
                    delete(&mut c1, b.bubble_id, &rep1).await;
                }
            }
        }));
        // Steady calls.
        let (spec2, rep2, mut c2) = (spec.clone(), rep.clone(), c);
        tasks.push(tokio::spawn(async move {
            if let Some(b) = new_bubble(&mut c2, &spec2, &rep2).await {
                for _ in 0..spec2.steady_calls {
                    call(&mut c2, &b.bubble_id, &rep2, "steady").await;
                }
                delete(&mut c2, b.bubble_id, &rep2).await;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("load task: {e}"))?;
    }
    let elapsed = start.elapsed();
    let mut r = Arc::try_unwrap(rep)
        .map_err(|_| "load tasks still hold the report".to_string())?
        .into_inner();
    r.elapsed = elapsed;
    Ok(r)
}
