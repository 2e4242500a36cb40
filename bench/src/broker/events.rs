//! Event-driven portions, on the embedded queue and through NATS
//! JetStream (a `nats-server` the bench starts, `nats`): `event_to_start`
//! (PublishEvent sent by this client → the broker hands the portion's CALL
//! to the VMM: the broker stamps that `Instant` just before it writes the
//! CALL frame to the VMM's socket, and this client, in the same process,
//! reads it with `Broker::trigger_last_start`), `event_to_result`
//! (PublishEvent sent → its signed result readable), both one event at a
//! time with a warm bubble with the portion loaded, and `events_per_sec`
//! (four bubbles, four triggers, a backlog of events published as fast as
//! one parent can).
//!
//! `event_to_result` also reports the same portion called directly
//! (`Call`, signed) in the same run as `call_p50_us`, and the difference
//! as `dispatch_p50_us`: the cost the event path adds to a call.

use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;
use bubbled::client;
use serde_json::json;

use super::Ctx;
use crate::stats::{round, stat, us, Stat};

/// A portion whose `echo` writes its input back.
const ECHO_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "echo") (result i32)
    (local $n i32)
    (local.set $n (call $input_len))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (i32.const 0))
)
"#;

/// A 16 MiB bubble with the echo portion loaded as `ev`, and a trigger on
/// `subject` (of `source`: "embedded" or "nats") running `ev.echo` in it;
/// (bubble id, trigger id).
async fn echo_trigger(
    x: &mut Ctx,
    subject: &str,
    source: &str,
) -> anyhow::Result<(String, String)> {
    let b =
        x.c.create_bubble(pb::CreateBubbleRequest {
            memory_mib: 16,
            ..x.create.clone()
        })
        .await?
        .into_inner();
    x.c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "ev".into(),
        module: wat::parse_str(ECHO_WAT)?,
    })
    .await?;
    let t =
        x.c.create_trigger(pb::CreateTriggerRequest {
            subject: subject.into(),
            bubble_id: b.bubble_id.clone(),
            portion: "ev".into(),
            function: "echo".into(),
            batch_size: 16,
            source: source.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((b.bubble_id, t.trigger_id))
}

fn event(subject: &str, key: &str) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        subject: subject.into(),
        key: key.into(),
        payload: key.as_bytes().to_vec(),
    }
}

/// PublishEvent, sent again while the broker answers UNAVAILABLE (a new
/// NATS trigger not connected yet), 10 s at most.
async fn publish(c: &mut client::Client, req: pb::PublishEventRequest) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match c.publish_event(req.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Polls GetResult back to back until `key` has an `ok` result (10 s
/// at most).
async fn wait_ok(c: &mut client::Client, trigger: &str, key: &str) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get_result(pb::GetResultRequest {
                trigger_id: trigger.into(),
                key: key.into(),
            })
            .await?
            .into_inner();
        match r.outcome.as_str() {
            "ok" => return Ok(()),
            "pending" => anyhow::ensure!(Instant::now() < end, "no result for {key} in 10 s"),
            other => anyhow::bail!("{key}: {other}: {}", r.reason),
        }
    }
}

/// `n` events one at a time (after 50 unmeasured): PublishEvent sent →
/// result readable.
pub(crate) async fn event_to_result(x: &mut Ctx, n: usize) -> anyhow::Result<Stat> {
    let (bubble, t) = echo_trigger(x, "bench.one", "embedded").await?;
    let mut v = Vec::with_capacity(n);
    for i in 0..(50 + n) {
        let key = format!("one-{i}");
        let start = Instant::now();
        x.c.publish_event(event("bench.one", &key)).await?;
        wait_ok(&mut x.c, &t, &key).await?;
        if i >= 50 {
            v.push(start.elapsed());
        }
    }
    // The same portion called directly, signed as the dispatcher's call is.
    let req = pb::CallRequest {
        bubble_id: bubble.clone(),
        op: "echo".into(),
        portion: "ev".into(),
        input: b"one-1000".to_vec(),
        sign: true,
        ..Default::default()
    };
    let mut calls = Vec::with_capacity(n);
    for i in 0..(50 + n) {
        let start = Instant::now();
        x.c.call(req.clone()).await?;
        if i >= 50 {
            calls.push(start.elapsed());
        }
    }
    let call = stat(calls);
    let mut s = stat(v);
    s.extra
        .insert("call_p50_us".into(), json!(round(us(call.p50))));
    s.extra.insert(
        "dispatch_p50_us".into(),
        json!(round(us(s.p50) - us(call.p50))),
    );
    x.c.delete_trigger(pb::TriggerRef { trigger_id: t }).await?;
    x.c.delete_bubble(pb::BubbleRef { bubble_id: bubble })
        .await?;
    Ok(s)
}

/// `n` events over four bubbles (four triggers, round robin), published
/// back to back; the stat is the PublishEvent round trip, `per_sec` the
/// events done per second from the first publish to the last result.
pub(crate) async fn events_per_sec(x: &mut Ctx, n: usize, source: &str) -> anyhow::Result<Stat> {
    let mut set = Vec::new();
    for i in 0..4 {
        set.push(echo_trigger(x, &format!("bench.many{i}.{source}"), source).await?);
    }
    // Warm: one event through each trigger first (a NATS trigger is
    // connected then), not counted.
    for (i, (_, t)) in set.iter().enumerate() {
        let (s, k) = (format!("bench.many{i}.{source}"), format!("w-{source}-{i}"));
        publish(&mut x.c, event(&s, &k)).await?;
        wait_ok(&mut x.c, t, &k).await?;
    }
    let start = Instant::now();
    let mut publishes = Vec::with_capacity(n);
    for i in 0..n {
        let s = format!("bench.many{}.{source}", i % 4);
        let t = Instant::now();
        publish(&mut x.c, event(&s, &format!("m-{source}-{i}"))).await?;
        publishes.push(t.elapsed());
    }
    // Results come in publish order per trigger: the last one of each
    // is the last to wait for.
    // With one worker per trigger on a named bubble, results come in
    // publish order per trigger: the last one of each is the last to
    // wait for.
    for i in (n.saturating_sub(4))..n {
        wait_ok(&mut x.c, &set[i % 4].1, &format!("m-{source}-{i}")).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    for i in 0..n {
        wait_ok(&mut x.c, &set[i % 4].1, &format!("m-{source}-{i}")).await?;
    }
    let mut s = stat(publishes);
    s.extra
        .insert("per_sec".into(), json!(round(n as f64 / secs)));
    s.extra.insert("bubbles".into(), json!(4));
    s.extra.insert("source".into(), json!(source));
    for (b, t) in set {
        x.c.delete_trigger(pb::TriggerRef { trigger_id: t }).await?;
        x.c.delete_bubble(pb::BubbleRef { bubble_id: b }).await?;
    }
    Ok(s)
}

/// `n` events one at a time (after 50 unmeasured) on `source`:
/// PublishEvent sent → the broker hands the portion's CALL to the VMM
/// (its stamp, read in process); also the PublishEvent round trip and
/// the time to the result readable, per event.
pub(crate) async fn event_to_start(x: &mut Ctx, n: usize, source: &str) -> anyhow::Result<Stat> {
    let subject = format!("bench.start.{source}");
    let (bubble, t) = echo_trigger(x, &subject, source).await?;
    let (mut starts, mut publishes, mut results) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..(50 + n) {
        let key = format!("s-{source}-{i}");
        let sent = Instant::now();
        publish(&mut x.c, event(&subject, &key)).await?;
        let acked = sent.elapsed();
        wait_ok(&mut x.c, &t, &key).await?;
        let done = sent.elapsed();
        let (k, at) = x
            .broker
            .trigger_last_start(&t)
            .ok_or_else(|| anyhow::anyhow!("no start stamp for trigger {t}"))?;
        anyhow::ensure!(
            k == key || k.ends_with(&format!(":{key}")),
            "the last start was {k}, not {key}"
        );
        anyhow::ensure!(at >= sent, "{key} started before it was sent");
        if i >= 50 {
            starts.push(at - sent);
            publishes.push(acked);
            results.push(done);
        }
    }
    let (p, r) = (stat(publishes), stat(results));
    let mut s = stat(starts);
    s.extra
        .insert("publish_p50_us".into(), json!(round(us(p.p50))));
    s.extra
        .insert("publish_p99_us".into(), json!(round(us(p.p99))));
    s.extra
        .insert("result_p50_us".into(), json!(round(us(r.p50))));
    s.extra
        .insert("result_p99_us".into(), json!(round(us(r.p99))));
    s.extra.insert("source".into(), json!(source));
    x.c.delete_trigger(pb::TriggerRef { trigger_id: t }).await?;
    x.c.delete_bubble(pb::BubbleRef { bubble_id: bubble })
        .await?;
    Ok(s)
}
