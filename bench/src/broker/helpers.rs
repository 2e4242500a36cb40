//! Helpers of the metrics measured through the broker.

use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use bubbled::client;
use bubbled::core::Broker;

pub(crate) const PAYMENTS_WAT: &str = include_str!("../../../examples/payments/payments.wat");
pub(crate) const TOUCH_WAT: &str = include_str!("../../../examples/payments/touch.wat");

/// Total size of the files under `dir` (bytes).
pub(crate) fn dir_size(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        n += if p.is_dir() {
            dir_size(&p)
        } else {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    n
}

/// 200 warm-up calls, then `n` timed calls of `req`, each checked to
/// return `out_len` bytes.
pub(crate) async fn time_calls(
    c: &mut client::Client,
    req: &pb::CallRequest,
    n: usize,
    out_len: usize,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..200 {
        c.call(req.clone()).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c.call(req.clone()).await?.into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(r.output.len() == out_len);
    }
    Ok(v)
}

/// A bubble with the payments portion and a provisioned tokenization key,
/// in the order grants require: load, attest (here the unverified binding;
/// it freezes the code), provision.
pub(crate) async fn payments_bubble(
    c: &client::Client,
    create: &pb::CreateBubbleRequest,
) -> anyhow::Result<bubble_client::Bubble> {
    let mut c = c.clone();
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into(), "gateway_key".into()],
                }],
                ..Default::default()
            }),
            ..create.clone()
        })
        .await?
        .into_inner();
    let parent = bubble_client::Parent::from_client(c.clone());
    let mut bubble = parent.bubble(&b.bubble_id);
    bubble
        .load_portion("payments", &wat::parse_str(PAYMENTS_WAT)?)
        .await?;
    bubble.trust_unverified().await?;
    bubble.provision("tokenization_key", &[0x5a; 32]).await?;
    Ok(bubble)
}

/// A tokenize call of the payments portion.
pub(crate) fn tokenize_req(id: &str) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: id.to_string(),
        op: "tokenize".into(),
        input: b"4111111111111111".to_vec(),
        portion: "payments".into(),
        ..Default::default()
    }
}

/// The value of the first sample of metric `name` in a Prometheus scrape
/// (0 when absent).
pub(crate) fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the warm pool holds `depth` READY bubbles. (Waiting also
/// for the spare VMM processes, so that nothing else runs, made attach
/// slower on this VM: idle vCPUs wake up slowly. See docs/performance.md.)
pub(crate) async fn wait_pool(broker: &Broker, depth: usize) {
    wait_pool_of(broker, "warm", depth).await
}

/// [`wait_pool`] for the pool `profile`.
pub(crate) async fn wait_pool_of(broker: &Broker, profile: &str, depth: usize) {
    let key = format!("bubbled_pool_depth{{profile=\"{profile}\"}}");
    for _ in 0..2000 {
        let m = broker.scrape();
        if metric_value(&m, &key) >= depth as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
