//! `bubblectl demo`: a broker on embedded defaults in a temporary directory,
//! a few bubbles created, called and deleted, and a short timing table.

use std::time::{Duration, Instant};

use anyhow::Context;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::config::BrokerConfig;
use crate::service::Broker;
use crate::{client, server};

/// Percentile (0-100) of a sorted slice of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn row(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{:<22} {:>6} {:>11.1} {:>11.1}",
        name,
        v.len(),
        percentile(&v, 50.0).as_secs_f64() * 1e6,
        percentile(&v, 99.0).as_secs_f64() * 1e6
    );
}

/// Runs the demo.
pub async fn run(bubbles: usize, calls: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("bubbled-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    println!("bubbled demo: broker data dir {}", dir.path().display());
    let cfg = BrokerConfig::new(dir.path().to_path_buf())?;
    let broker = Broker::open(cfg).await?;
    let sock = dir.path().join("bubbled.sock");
    let listener = server::bind_unix(&sock)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve_unix(broker.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    let mut c = client::connect_unix(&sock).await?;

    let mut creates = Vec::new();
    let mut ids = Vec::new();
    for i in 0..bubbles {
        let t = Instant::now();
        let b = c
            .create_bubble(pb::CreateBubbleRequest {
                idle: None,
                policy: None,
                client_request_id: format!("demo-{i}"),
                memory_mib: 64,
                vcpus: 1,
                image: String::new(),
            })
            .await?
            .into_inner();
        creates.push(t.elapsed());
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "bubble {} did not become ready: {}",
            b.bubble_id,
            b.failure_reason
        );
        println!(
            "created {} (guest boot {:.2} ms)",
            b.bubble_id,
            b.boot_us as f64 / 1e3
        );
        ids.push(b.bubble_id);
    }

    let mut echo = Vec::new();
    let mut sha = Vec::new();
    let payload = vec![0x5au8; 64];
    for id in &ids {
        for _ in 0..calls {
            let t = Instant::now();
            let r = c
                .call(pb::CallRequest {
                    bubble_id: id.clone(),
                    op: "echo".into(),
                    input: payload.clone(),
                    deadline_ms: 0,
                    ..Default::default()
                })
                .await?
                .into_inner();
            echo.push(t.elapsed());
            anyhow::ensure!(r.output == payload, "echo returned other bytes");
        }
        let input = format!("hello from the parent to {id}").into_bytes();
        let t = Instant::now();
        let r = c
            .call(pb::CallRequest {
                bubble_id: id.clone(),
                op: "sha256".into(),
                input: input.clone(),
                deadline_ms: 0,
                ..Default::default()
            })
            .await?
            .into_inner();
        sha.push(t.elapsed());
        anyhow::ensure!(
            r.output == Sha256::digest(&input).as_slice(),
            "sha256 computed in the guest differs from the host's"
        );
    }
    println!("sha256 computed inside each bubble matches the host's");

    let mut deletes = Vec::new();
    for id in &ids {
        let t = Instant::now();
        c.delete_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await?;
        deletes.push(t.elapsed());
    }

    println!();
    println!(
        "{:<22} {:>6} {:>11} {:>11}",
        "operation", "n", "p50 (µs)", "p99 (µs)"
    );
    row("create to READY", creates);
    row("call echo 64 B", echo);
    row("call sha256", sha);
    row("delete", deletes);
    println!();
    println!("(numbers from this demo are indicative; see docs/performance.md and bubble-bench)");

    let _ = stop_tx.send(());
    let _ = srv.await;
    broker.shutdown_all().await;
    Ok(())
}
