//! `await_resume`: event arrival → portion resumed. A portion awaits the
//! key it is given (its bubble is frozen to the local store); the timed
//! part starts when the event with that key is published and ends when
//! the resumed call's result is stored (restore, RESUME, the rest of the
//! call, the signed result), polled every 200 µs.

use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;

use super::Ctx;
use crate::stats::{stat, Stat};

/// The portion: writes its input, awaits it as a key, writes the payload.
const AWAIT_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "bubble_v1" "await_event" (func $await (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "pay") (result i32)
    (local $n i32) (local $r i32)
    (local.set $n (call $input_len))
    (if (i32.gt_s (local.get $n) (i32.const 64)) (then (return (i32.const 2))))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (local.set $r (call $await (i32.const 0) (local.get $n) (i32.const 60000)
                            (i32.const 1024) (i32.const 4096)))
    (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.const 3))))
    (drop (call $output_write (i32.const 1024) (local.get $r)))
    (i32.const 0))
)
"#;

async fn publish(c: &mut bubbled::client::Client, key: &str, payload: &[u8]) -> anyhow::Result<()> {
    c.publish_event(pb::PublishEventRequest {
        subject: "pay".into(),
        key: key.into(),
        payload: payload.to_vec(),
    })
    .await?;
    Ok(())
}

/// `n` await → freeze → event → resumed rounds on one 16 MiB bubble.
pub(crate) async fn await_resume(x: &mut Ctx, n: usize) -> anyhow::Result<Stat> {
    let mut c = x.c.clone();
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            memory_mib: 16,
            ..x.create.clone()
        })
        .await?
        .into_inner();
    let id = b.bubble_id.clone();
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: id.clone(),
        name: "aw".into(),
        module: wat::parse_str(AWAIT_WAT)?,
    })
    .await?;
    let t = c
        .create_trigger(pb::CreateTriggerRequest {
            subject: "pay".into(),
            bubble_id: id.clone(),
            portion: "aw".into(),
            function: "pay".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .trigger_id;
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let (order, cap) = (format!("order-{i}"), format!("cap-{i}"));
        publish(&mut c, &order, cap.as_bytes()).await?;
        // Frozen: SUSPENDED in the registry.
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let d = c
                .describe_bubble(pb::BubbleRef {
                    bubble_id: id.clone(),
                })
                .await?
                .into_inner();
            if d.state == pb::BubbleState::Suspended as i32 {
                break;
            }
            anyhow::ensure!(Instant::now() < end, "round {i}: the bubble did not freeze");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the freeze's background work (spare VMM refill) settle.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        publish(&mut c, &cap, b"captured").await?;
        loop {
            let r = c
                .get_result(pb::GetResultRequest {
                    trigger_id: t.clone(),
                    key: order.clone(),
                })
                .await?
                .into_inner();
            if r.outcome != "pending" {
                anyhow::ensure!(r.outcome == "ok", "round {i}: {r:?}");
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "round {i}: not resumed"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // The first rounds warm the spare VMMs and the store.
        if i >= 3 {
            v.push(started.elapsed());
        }
    }
    c.delete_trigger(pb::TriggerRef { trigger_id: t }).await?;
    c.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
    Ok(stat(v))
}
