//! `usage`, `load`, `demo`.

use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::Args;
use serde_json::json;

use super::output::{hex, status_err, unhex};
use super::Conn;

#[derive(Debug, Args)]
pub(super) struct UsageArgs {
    /// Bubble id.
    bubble: String,
    /// Require the report to be signed by this broker key (hex).
    #[arg(long)]
    broker_key: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct LoadArgs {
    /// Parents (each gets a certificate load-<i> in --pki).
    #[arg(long, default_value_t = 8)]
    parents: usize,
    /// Churn rounds per parent (create or attach, calls, delete).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Calls per churn round.
    #[arg(long, default_value_t = 5)]
    calls_per_round: usize,
    /// Steady calls per parent on one long-lived bubble.
    #[arg(long, default_value_t = 200)]
    steady_calls: usize,
    /// Attach from this warm-pool profile instead of creating.
    #[arg(long)]
    profile: Option<String>,
    /// Guest memory of created bubbles.
    #[arg(long, default_value_t = 16)]
    memory_mib: u32,
}

#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Number of bubbles.
    #[arg(long, default_value_t = 4)]
    bubbles: usize,
    /// Calls per bubble.
    #[arg(long, default_value_t = 200)]
    calls: usize,
}

/// Fetches a bubble's usage report and verifies the broker's signature
/// (against `--broker-key` when given) before printing it.
pub(super) async fn usage(conn: &Conn, a: UsageArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let r = c
        .get_usage(pb::BubbleRef {
            bubble_id: a.bubble,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let key: [u8; 32] = match &a.broker_key {
        Some(h) => unhex(h)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("--broker-key must be 32 bytes of hex"))?,
        None => r
            .broker_public_key
            .clone()
            .try_into()
            .map_err(|_| anyhow::anyhow!("report carries a malformed broker key"))?,
    };
    crate::obs::usage::verify(&r, &key)
        .map_err(|e| anyhow::anyhow!("usage report does not verify: {e}"))?;
    let u = r.usage.unwrap_or_default();
    if j {
        let mut v: serde_json::Value = serde_json::from_slice(&r.signed_json)?;
        v["signature_hex"] = json!(hex(&r.signature));
        v["broker_key_hex"] = json!(hex(&key));
        v["signature_valid"] = json!(true);
        println!("{v}");
    } else {
        println!("bubble           {}", u.bubble_id);
        println!("vcpu time        {:.3} ms", u.vcpu_us as f64 / 1e3);
        println!("memory           {:.1} MiB-seconds", u.memory_mib_seconds);
        println!("calls            {}", u.calls);
        println!("bytes in / out   {} / {}", u.bytes_in, u.bytes_out);
        println!(
            "signature        valid (broker key {}{})",
            hex(&key),
            if a.broker_key.is_some() {
                ", pinned"
            } else {
                ", as reported: pin it with --broker-key"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the load test; fails (exit 1) when any request failed.
pub(super) async fn load(conn: &Conn, a: LoadArgs, j: bool) -> anyhow::Result<ExitCode> {
    let endpoint = conn
        .endpoint
        .clone()
        .context("load needs --endpoint (mutual TLS, one certificate per parent)")?;
    let pki = conn.pki.clone().context("load needs --pki DIR")?;
    eprintln!(
        "load: {} parents x ({} churn rounds + {} steady calls)...",
        a.parents, a.rounds, a.steady_calls
    );
    let spec = crate::load::LoadSpec {
        endpoint,
        pki,
        parents: a.parents,
        rounds: a.rounds,
        calls_per_round: a.calls_per_round,
        steady_calls: a.steady_calls,
        profile: a.profile,
        memory_mib: a.memory_mib,
    };
    let rep = crate::load::run(spec).await.map_err(anyhow::Error::msg)?;
    if j {
        println!("{}", rep.to_json());
    } else {
        rep.print();
    }
    if rep.error_count() > 0 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The demo: its own broker, a few bubbles, a timing table.
pub(super) async fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::demo::run(a.bubbles, a.calls).await?;
    Ok(ExitCode::SUCCESS)
}
