//! Helpers of the trigger tests: a portion that echoes, refuses or traps,
//! and waits for results with a deadline that fails the test.

use std::time::{Duration, Instant};

use bubble_proto::v1 as pb;

use tonic::Code;

use crate::{describe, Client};

/// The events portion: `echo` writes the payload back, except a payload
/// starting with `poison` (traps: unreachable) or `refuse` (returns 1);
/// `slow` spins 200,000 rounds first.
pub const EVENTS_WAT: &str = r#"
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "slow") (result i32)
    (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 200000))))
    (call $echo))
  (func $echo (export "echo") (result i32)
    (local $n i32)
    (local.set $n (call $input_len))
    (if (i32.gt_s (local.get $n) (i32.const 60000)) (then (return (i32.const 2))))
    (drop (call $input_read (i32.const 0) (local.get $n)))
    ;; "pois" little-endian
    (if (i32.and (i32.ge_s (local.get $n) (i32.const 4))
                 (i32.eq (i32.load (i32.const 0)) (i32.const 0x73696f70)))
      (then unreachable))
    ;; "refu"
    (if (i32.and (i32.ge_s (local.get $n) (i32.const 4))
                 (i32.eq (i32.load (i32.const 0)) (i32.const 0x75666572)))
      (then (return (i32.const 1))))
    (drop (call $output_write (i32.const 0) (local.get $n)))
    (i32.const 0))
)
"#;

/// The events portion, compiled.
pub fn events_module() -> Vec<u8> {
    wat::parse_str(EVENTS_WAT).expect("events portion")
}

/// Creates a 16 MiB bubble with the events portion loaded as `ev`.
pub async fn bubble_with_portion(c: &mut Client) -> String {
    let b = c
        .create_bubble(crate::create_req(16))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        b.state,
        pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "ev".into(),
        module: events_module(),
    })
    .await
    .expect("load portion");
    b.bubble_id
}

/// A trigger on `subject` running `ev.echo` in `bubble`.
pub fn trigger_req(subject: &str, bubble: &str) -> pb::CreateTriggerRequest {
    pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "ev".into(),
        function: "echo".into(),
        ..Default::default()
    }
}

/// Publishes `payload` as `key` on `subject`; whether it was new.
pub async fn publish(c: &mut Client, subject: &str, key: &str, payload: &[u8]) -> bool {
    !c.publish_event(pb::PublishEventRequest {
        subject: subject.into(),
        key: key.into(),
        payload: payload.to_vec(),
    })
    .await
    .expect("publish")
    .into_inner()
    .duplicate
}

/// Waits until every key in `keys` has a result other than pending and
/// returns them in order; fails the test after `limit` naming the keys
/// still pending.
pub async fn results(
    c: &mut Client,
    trigger: &str,
    keys: &[String],
    limit: Duration,
) -> Vec<pb::EventResult> {
    let end = Instant::now() + limit;
    let mut done: Vec<Option<pb::EventResult>> = vec![None; keys.len()];
    loop {
        for (i, k) in keys.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let r = get_one(c, trigger, k).await;
            if r.outcome != "pending" {
                done[i] = Some(r);
            }
        }
        let pending: Vec<&String> = keys
            .iter()
            .zip(&done)
            .filter(|(_, r)| r.is_none())
            .map(|(k, _)| k)
            .collect();
        if pending.is_empty() {
            return done.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < end,
            "{} results still pending after {limit:?}: {:?}",
            pending.len(),
            &pending[..pending.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Verifies an `ok` result of `ev.echo` with the bubble's signing key.
pub fn verify(sig_pk: &[u8; 32], r: &pb::EventResult, payload: &[u8]) {
    verify_fn(sig_pk, r, "echo", payload)
}

/// Verifies an `ok` result's signature with the bubble's signing key (the
/// bubble signed the portion-call frame of `ev.<function>` and the
/// payload).
pub fn verify_fn(sig_pk: &[u8; 32], r: &pb::EventResult, function: &str, payload: &[u8]) {
    assert_eq!(r.outcome, "ok", "{r:?}");
    let frame = bubble_abi_frame(function, payload);
    let plain = bubble_keys::verify_and_open_result(
        sig_pk,
        &r.bubble_id,
        r.call_id,
        &frame,
        &r.output,
        &r.signature,
        None,
    )
    .expect("result signature verifies");
    assert_eq!(plain.expose(), payload);
}

fn bubble_abi_frame(function: &str, payload: &[u8]) -> Vec<u8> {
    bubble_abi::ops::PortionCall {
        portion: "ev",
        function,
        input: payload,
    }
    .encode()
    .expect("frame")
}

/// The bubble's Ed25519 signing key (its `keys` op).
pub async fn sig_pk(c: &mut Client, bubble: &str) -> [u8; 32] {
    let keys = c
        .call(crate::call_req(bubble, "keys", b""))
        .await
        .expect("keys")
        .into_inner()
        .output;
    keys[32..64].try_into().expect("32 bytes")
}

/// The stored result of `key` (outcome "pending" until there is one).
async fn get_one(c: &mut Client, trigger: &str, key: &str) -> pb::EventResult {
    c.get_result(pb::GetResultRequest {
        trigger_id: trigger.into(),
        key: key.into(),
    })
    .await
    .expect("get result")
    .into_inner()
}

/// How many of `keys` have a result now.
pub async fn done_count(c: &mut Client, trigger: &str, keys: &[String]) -> usize {
    let mut n = 0;
    for k in keys {
        let r = get_one(c, trigger, k).await;
        n += usize::from(r.outcome != "pending");
    }
    n
}

/// Waits until the first `n` of `keys` have a result (looking in order
/// and stopping at the first pending one, so it answers quickly while a
/// stream runs); returns `n`. Fails the test after `limit`.
pub async fn wait_done(
    c: &mut Client,
    trigger: &str,
    keys: &[String],
    n: usize,
    limit: Duration,
) -> usize {
    let end = Instant::now() + limit;
    loop {
        let mut d = 0;
        for k in keys {
            let r = get_one(c, trigger, k).await;
            if r.outcome == "pending" {
                // Processed roughly in order: look again from the start.
                break;
            }
            d += 1;
            if d >= n {
                return d;
            }
        }
        assert!(Instant::now() < end, "{d} of {n} results after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether some of `keys` has no result yet (looking from the last, the
/// one processed last, so it answers at once while a stream runs).
pub async fn any_pending(c: &mut Client, trigger: &str, keys: &[String]) -> bool {
    for k in keys.iter().rev() {
        let r = get_one(c, trigger, k).await;
        if r.outcome == "pending" {
            return true;
        }
    }
    false
}

/// A trigger's dead letters, as its owner lists them.
pub async fn dead_letters(c: &mut Client, t: &str) -> Vec<pb::DeadLetter> {
    c.list_dead_letters(pb::TriggerRef {
        trigger_id: t.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .dead_letters
}

/// After `bad-1` (poison) and `good-1` were published to `trigger` (on
/// `bubble`, `before` calls, `max_deliver` 2): `bad-1` failed and is the
/// one dead letter (2 attempts), `good-1` is ok; parent `b` is refused
/// listing and replaying exactly as for an unknown trigger id, and
/// changes nothing; a key that is not dead is NOT_FOUND to replay.
pub async fn poison_dead_lettered_for_its_owner_only(
    a: &mut Client,
    b: &mut Client,
    trigger: &str,
    bubble: &str,
    before: u64,
    limit: Duration,
) {
    let keys = ["bad-1".to_string(), "good-1".to_string()];
    let r = results(a, trigger, &keys, limit).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    assert_eq!(r[1].outcome, "ok", "{:?}", r[1]);
    let d = dead_letters(a, trigger).await;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].key.as_str(), d[0].attempts), ("bad-1", 2));
    assert!(!d[0].reason.is_empty());
    assert_eq!(describe(a, bubble).await.calls, before + 3);

    // Parent b: refused exactly as for an unknown trigger id.
    let unknown = format!("t-{}", "0".repeat(32));
    for id in [trigger, unknown.as_str()] {
        let e = b
            .list_dead_letters(pb::TriggerRef {
                trigger_id: id.to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_eq!(
            e.message().replace(id, "ID"),
            "bubble ID is not accessible to this parent",
        );
        let e = b
            .replay_dead_letter(pb::ReplayDeadLetterRequest {
                trigger_id: id.to_string(),
                key: "bad-1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // Nothing of b's touched it.
    assert_eq!(dead_letters(a, trigger).await.len(), 1);

    // Only a dead letter can be replayed.
    let e = a
        .replay_dead_letter(pb::ReplayDeadLetterRequest {
            trigger_id: trigger.to_string(),
            key: "good-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}
