//! Create, call, attestation and warm-attach latencies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use serde_json::json;

use super::helpers::{metric_value, time_calls, wait_pool, wait_pool_of};
use super::Ctx;
use crate::stats::{round, stat, us, Stat};

/// Cold CreateBubble until READY, then delete, `n` times.
pub(crate) async fn create_to_ready(
    x: &mut Ctx,
    n: usize,
    pool_filling: bool,
) -> anyhow::Result<Stat> {
    if pool_filling {
        wait_pool(&x.broker, 4).await;
    }
    let mut v = Vec::new();
    let mut steps: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let _ = crate::steps::take();
    for _ in 0..n {
        let t = Instant::now();
        let b = x.c.create_bubble(x.create.clone()).await?.into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "{}",
            b.failure_reason
        );
        // The VMM logs its steps once the guest's start-up is over,
        // after READY (at READY_EARLY): waited for outside the timing.
        let log = x.dir.join("bubbles").join(&b.bubble_id).join("vmm.log");
        for (k, us) in logged_steps(&log).await {
            steps.entry(k).or_default().push(Duration::from_micros(us));
        }
        x.c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    let mut s = stat(v);
    let p50s: serde_json::Map<String, serde_json::Value> = steps
        .into_iter()
        .map(|(k, v)| (k, json!(round(us(stat(v).p50)))))
        .collect();
    s.extra.insert("vmm_steps_p50_us".into(), p50s.into());
    // The broker's own steps (µs since it received the request), p50 of
    // each over the creates a spare served.
    let mut broker: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let seen = crate::steps::take();
    let spares = seen.iter().filter(|m| m.get("spare") == Some(&1)).count();
    for m in seen.iter().filter(|m| m.get("spare") == Some(&1)) {
        for (k, v) in m.iter().filter(|(k, _)| k.ends_with("_us")) {
            broker
                .entry(k.clone())
                .or_default()
                .push(Duration::from_micros(*v));
        }
    }
    let p50s: serde_json::Map<String, serde_json::Value> = broker
        .into_iter()
        .map(|(k, v)| (k, json!(round(us(stat(v).p50)))))
        .collect();
    s.extra.insert("broker_steps_p50_us".into(), p50s.into());
    s.extra.insert("served_by_spares".into(), json!(spares));
    Ok(s)
}

/// The steps of the VMM log `log`, once it has written them (at most a
/// second's wait: none if it never does).
async fn logged_steps(log: &std::path::Path) -> Vec<(String, u64)> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let steps = vmm_steps(&std::fs::read_to_string(log).unwrap_or_default());
        if !steps.is_empty() || Instant::now() > until {
            return steps;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Cold CreateBubble, then at once its first GetAttestation (which needs
/// the guest's keys) from the same client, `n` times: what a user waiting
/// for an attested bubble sees. The extra `first_attestation_p50_us` is
/// the second part alone.
pub(crate) async fn create_then_attest(x: &mut Ctx, n: usize) -> anyhow::Result<Stat> {
    let mut v = Vec::new();
    let mut attest = Vec::new();
    for i in 0..n as u32 {
        let t = Instant::now();
        let b = x.c.create_bubble(x.create.clone()).await?.into_inner();
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "{}",
            b.failure_reason
        );
        let t_ready = t.elapsed();
        let a =
            x.c.get_attestation(pb::GetAttestationRequest {
                bubble_id: b.bubble_id.clone(),
                nonce: [i.to_le_bytes(); 8].concat(),
            })
            .await?
            .into_inner();
        v.push(t.elapsed());
        attest.push(t.elapsed() - t_ready);
        anyhow::ensure!(a.report.len() == 1184, "no report");
        x.c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    let mut s = stat(v);
    s.extra.insert(
        "first_attestation_p50_us".into(),
        json!(round(us(stat(attest).p50))),
    );
    Ok(s)
}

/// The `key_us=value` steps of the VMM's `boot_us=... steps: ...` log line.
fn vmm_steps(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|l| l.split_once(" steps: "))
        .flat_map(|(_, rest)| rest.split_whitespace())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `n` Call round trips of a 64-byte echo, with the same calls with the
/// broker's answer polling off as the baseline in the same run.
pub(crate) async fn call_echo_64b(
    x: &mut Ctx,
    n: usize,
    answer_poll_us: u32,
) -> anyhow::Result<Stat> {
    let b = x.c.create_bubble(x.create.clone()).await?.into_inner();
    let req = pb::CallRequest {
        bubble_id: b.bubble_id.clone(),
        op: "echo".into(),
        input: vec![0xa5; 64],
        deadline_ms: 0,
        ..Default::default()
    };
    // Baseline in the same run: the same calls with the broker's answer
    // polling off (its thread sleeps until the VMM answers).
    bubble_vmm_client::set_answer_poll(Duration::ZERO);
    let sleeping = stat(time_calls(&mut x.c, &req, n, 64).await?);
    bubble_vmm_client::set_answer_poll(Duration::from_micros(u64::from(answer_poll_us)));
    let m0 = x.broker.scrape();
    let mut s = stat(time_calls(&mut x.c, &req, n, 64).await?);
    s.extra.insert(
        "answer_poll_off_p50_us".into(),
        json!(round(us(sleeping.p50))),
    );
    s.extra.insert(
        "answer_poll_off_p99_us".into(),
        json!(round(us(sleeping.p99))),
    );
    let m = x.broker.scrape();
    let delta = |k: &str| metric_value(&m, k) - metric_value(&m0, k);
    let broker_mean =
        delta("bubbled_call_seconds_sum") / delta("bubbled_call_seconds_count").max(1.0);
    s.extra.insert(
        "broker_side_mean_us".into(),
        json!(round(broker_mean * 1e6)),
    );
    x.c.delete_bubble(pb::BubbleRef {
        bubble_id: b.bubble_id,
    })
    .await?;
    Ok(s)
}

/// 200 GetAttestation calls with distinct nonces.
pub(crate) async fn get_attestation(x: &mut Ctx) -> anyhow::Result<Stat> {
    let b = x.c.create_bubble(x.create.clone()).await?.into_inner();
    let mut v = Vec::new();
    for i in 0..200u32 {
        let t = Instant::now();
        let a =
            x.c.get_attestation(pb::GetAttestationRequest {
                bubble_id: b.bubble_id.clone(),
                nonce: [i.to_le_bytes(); 8].concat(),
            })
            .await?
            .into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(a.report.len() == 1184);
    }
    x.c.delete_bubble(pb::BubbleRef {
        bubble_id: b.bubble_id,
    })
    .await?;
    Ok(stat(v))
}

/// 100 warm attaches from a refilled pool, with the broker's side and the
/// first RPC after an idle spell as extras.
pub(crate) async fn attach_warm(x: &mut Ctx) -> anyhow::Result<Stat> {
    attach_warm_with(x, "warm", None).await
}

/// The pool whose bubbles carry the payments policy.
pub(crate) const PAY_POOL: &str = "pay";

/// The payments policy (one grant) as the `pay` pool carries it.
pub(crate) fn pay_pool_policy() -> bubbled::config::PolicyConfig {
    bubbled::config::PolicyConfig {
        grants: vec![bubbled::config::GrantConfig {
            portion: "payments".into(),
            credentials: vec!["tokenization_key".into(), "gateway_key".into()],
        }],
        ..Default::default()
    }
}

/// The same payments policy as a parent asks for it.
fn pay_policy() -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: None,
        grants: vec![pb::CredentialGrant {
            portion: "payments".into(),
            credentials: vec!["tokenization_key".into(), "gateway_key".into()],
        }],
        ..Default::default()
    }
}

/// [`attach_warm`] with a security policy (one grant, as the payments
/// flow uses) from a pool whose bubbles the refiller booted with it: no
/// call into the guest at attach.
pub(crate) async fn attach_warm_policy(x: &mut Ctx) -> anyhow::Result<Stat> {
    attach_warm_with(x, PAY_POOL, Some(pay_policy())).await
}

/// The same policy from the policy-less pool: the broker installs it in
/// the pooled bubble (a `set_policy` call) before it hands it over.
pub(crate) async fn attach_warm_policy_cold(x: &mut Ctx) -> anyhow::Result<Stat> {
    attach_warm_with(x, "warm", Some(pay_policy())).await
}

async fn attach_warm_with(
    x: &mut Ctx,
    profile: &str,
    policy: Option<pb::SecurityPolicy>,
) -> anyhow::Result<Stat> {
    let mut v = Vec::new();
    let mut idle_first = Vec::new();
    let (mut first_call, mut second_call) = (Vec::new(), Vec::new());
    let before = x.broker.scrape();
    for _ in 0..100 {
        // Let the pool refill so that every sample is a warm attach.
        wait_pool_of(&x.broker, profile, 4).await;
        let t0 = Instant::now();
        x.c.list_bubbles(pb::ListBubblesRequest {
            include_deleted: false,
            ..Default::default()
        })
        .await?;
        idle_first.push(t0.elapsed());
        let t = Instant::now();
        let b =
            x.c.attach_bubble(pb::AttachBubbleRequest {
                profile: profile.into(),
                policy: policy.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(b.state == pb::BubbleState::Ready as i32);
        // The first calls into the bubble after the attach (is a call
        // into a VMM that idled in the pool slower than into a busy one?).
        for calls in [&mut first_call, &mut second_call] {
            let t = Instant::now();
            x.c.call(pb::CallRequest {
                bubble_id: b.bubble_id.clone(),
                op: "echo".into(),
                input: vec![0; 64],
                ..Default::default()
            })
            .await?;
            calls.push(t.elapsed());
        }
        x.c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id,
        })
        .await?;
    }
    let mut s = stat(v);
    let m = x.broker.scrape();
    // This run's alone (the counters are the broker's since it started).
    let delta = |k: &str| metric_value(&m, k) - metric_value(&before, k);
    s.extra.insert(
        "pool_misses".into(),
        json!(delta("bubbled_pool_misses_total")),
    );
    let server_mean =
        delta("bubbled_attach_seconds_sum") / delta("bubbled_attach_seconds_count").max(1.0);
    s.extra.insert(
        "broker_side_mean_us".into(),
        json!(round(server_mean * 1e6)),
    );
    s.extra.insert(
        "first_rpc_after_idle_p50_us".into(),
        json!(round(us(stat(idle_first).p50))),
    );
    s.extra.insert(
        "first_echo_after_attach_p50_us".into(),
        json!(round(us(stat(first_call).p50))),
    );
    s.extra.insert(
        "second_echo_after_attach_p50_us".into(),
        json!(round(us(stat(second_call).p50))),
    );
    Ok(s)
}
