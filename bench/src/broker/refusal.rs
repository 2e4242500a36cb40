//! `restore_refusal`: how long a broker takes to refuse importing a frozen
//! copy it cannot open, for each kind of refusal, interleaved in one run:
//! an unknown id (no copy), a copy under another key (foreign key), and a
//! copy whose manifest was damaged. All three must answer the same
//! PERMISSION_DENIED; their timings are what an oracle could tell apart.
//!
//! The copies are made by the bench's broker; a second broker sharing its
//! store (with probe throttling off) is asked to import them.

use std::time::{Duration, Instant};

use anyhow::Context;

use bubble_proto::v1 as pb;
use bubbled::client;
use bubbled::config::BrokerConfig;
use serde_json::json;

use super::Ctx;
use crate::stats::{round, stat, us, Stat};

/// Refusals of each kind.
const EACH: usize = 200;

/// The parent's key the copies are suspended under, and another one.
const KEK: [u8; 32] = [0x5a; 32];
const OTHER_KEK: [u8; 32] = [0xa5; 32];

/// A bubble of the bench's broker, suspended under `KEK`; its id and
/// generation.
async fn suspended(x: &mut Ctx) -> anyhow::Result<(String, u64)> {
    let b =
        x.c.create_bubble(pb::CreateBubbleRequest {
            memory_mib: 16,
            ..x.create.clone()
        })
        .await?
        .into_inner();
    let s =
        x.c.suspend_bubble(pb::SuspendBubbleRequest {
            bubble_id: b.bubble_id.clone(),
            kek: KEK.to_vec(),
        })
        .await?
        .into_inner();
    Ok((b.bubble_id, s.generation))
}

pub(crate) async fn restore_refusal(x: &mut Ctx) -> anyhow::Result<Stat> {
    let (foreign, fg) = suspended(x).await?;
    let (damaged, dg) = suspended(x).await?;
    // Damage the second copy's manifest: the last hex digit of its sealed
    // header (as tests/tests/oracles.rs does).
    let manifest = x
        .dir
        .join("store/frozen")
        .join(&damaged)
        .join(format!("g{dg}/manifest"));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)?;
    let h = m["header"]
        .as_str()
        .context("manifest without header")?
        .to_string();
    let flipped = if h.ends_with('0') { "1" } else { "0" };
    m["header"] = serde_json::Value::String(format!("{}{flipped}", &h[..h.len() - 1]));
    std::fs::write(&manifest, serde_json::to_vec(&m)?)?;

    let other = tempfile::Builder::new()
        .prefix("bubble-bench-b-")
        .tempdir()?;
    let mut cfg = BrokerConfig::new(other.path().to_path_buf())?;
    cfg.store_dir = x.dir.join("store");
    cfg.security.probe_strikes = usize::MAX;
    cfg.pools = Vec::new();
    let b = bubbled::demo::EmbeddedBroker::start(cfg).await?;
    let mut cb = client::connect_unix(&b.socket).await?;
    let unknown = format!("b-{}", "7".repeat(32));
    let cases: [(&str, &str, u64, &[u8]); 3] = [
        ("unknown", &unknown, 1, &KEK),
        ("foreign_key", &foreign, fg, &OTHER_KEK),
        ("damaged", &damaged, dg, &KEK),
    ];
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round_no in 0..EACH + 5 {
        for (i, (kind, id, generation, kek)) in cases.iter().enumerate() {
            let t = Instant::now();
            let r = cb
                .restore_bubble(pb::RestoreBubbleRequest {
                    bubble_id: id.to_string(),
                    kek: kek.to_vec(),
                    generation: *generation,
                })
                .await;
            let took = t.elapsed();
            match r {
                Err(st) if st.code() == tonic::Code::PermissionDenied => {}
                other => anyhow::bail!("{kind}: not refused alike: {other:?}"),
            }
            // The first rounds warm up.
            if round_no >= 5 {
                times[i].push(took);
            }
        }
    }
    b.stop().await?;
    let all: Vec<Duration> = times.iter().flatten().copied().collect();
    let mut s = stat(all);
    for ((kind, ..), v) in cases.iter().zip(times) {
        let k = stat(v);
        s.extra
            .insert(format!("{kind}_p50_us"), json!(round(us(k.p50))));
        s.extra
            .insert(format!("{kind}_p99_us"), json!(round(us(k.p99))));
    }
    Ok(s)
}
