//! Metering that can bill, as the attack on the bill: a bubble's vCPU time
//! never goes back (suspend/restore puts it in a new VMM whose counter
//! starts at 0; a broker restart re-adopts the VMM); a warm-pool bubble's
//! time in the pool (memory time, probe calls, vCPU time) is not billed to
//! the parent that attaches it, whose bill starts at the attach; and the
//! attach shows on that parent's `WatchEvents`.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

async fn usage(c: &mut Client, id: &str) -> pb::Usage {
    let r = c
        .get_usage(pb::BubbleRef {
            bubble_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let key: [u8; 32] = r.broker_public_key.clone().try_into().unwrap();
    bubbled::obs::usage::verify(&r, &key).unwrap();
    r.usage.unwrap()
}

/// Keeps the guest busy for a while (guest time well above 10 ms).
async fn burn(c: &mut Client, id: &str) {
    let mut input = 20_000u32.to_le_bytes().to_vec();
    input.extend(b"metering");
    for _ in 0..10 {
        c.call(call_req(id, "sha256_chain", &input)).await.unwrap();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_time_survives_suspend_restore_and_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = BrokerProc::start(dir.path(), false);
    let mut c = b.client().await;
    let id = c
        .create_bubble(create_req(32))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    burn(&mut c, &id).await;
    let u1 = usage(&mut c, &id).await;
    assert!(u1.vcpu_us > 1000, "{u1:?}");
    suspend_and_restore(&mut c, &id).await;
    let u2 = usage(&mut c, &id).await;
    assert!(u2.vcpu_us >= u1.vcpu_us, "after restore {u2:?} < {u1:?}");
    burn(&mut c, &id).await;
    let u3 = usage(&mut c, &id).await;
    assert!(u3.vcpu_us > u2.vcpu_us, "{u3:?} vs {u2:?}");
    // Twice: the second suspend keeps the first VMM's time too.
    suspend_and_restore(&mut c, &id).await;
    let u4 = usage(&mut c, &id).await;
    assert!(u4.vcpu_us >= u3.vcpu_us, "{u4:?} < {u3:?}");
    assert_eq!(u4.calls, 20);
    // A broker restart re-adopts the VMM: nothing goes back.
    drop(c);
    b.terminate();
    let b = BrokerProc::start(dir.path(), false);
    let mut c = b.client().await;
    let u5 = usage(&mut c, &id).await;
    assert!(u5.vcpu_us >= u4.vcpu_us, "after restart {u5:?} < {u4:?}");
    assert_eq!(u5.calls, 20);
    // And the deleted bubble's final record keeps the total.
    c.delete_bubble(pb::BubbleRef {
        bubble_id: id.clone(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_time_is_not_billed_and_attach_is_watched() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            config: Some("[[pool]]\nname = \"warm\"\nmemory_mib = 32\nsize = 1\n".into()),
            ..Default::default()
        },
    );
    let mut c = b.client().await;
    // The pooled bubble is READY and has been in the pool a while.
    let key = "bubbled_pool_depth{profile=\"warm\"}";
    wait_until(
        "pool warm at depth 1",
        Duration::from_secs(20),
        || {
            b.admin_get("/metrics")
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
                .unwrap_or(-1.0)
        },
        |d| *d >= 1.0,
    )
    .await;
    // Let it accumulate pool time (pacing, not synchronisation: the bill
    // must not include this second).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let before = now_ms();
    let t0 = std::time::Instant::now();
    let got = c
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "warm".into(),
            wait_ms: 0,
            idle: None,
            client_request_id: String::new(),
            policy: None,
        })
        .await
        .unwrap()
        .into_inner();
    let u = usage(&mut c, &got.bubble_id).await;
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        got.created_at_ms < before.saturating_sub(900),
        "not a pooled bubble"
    );
    assert!(
        u.from_ms >= before.saturating_sub(1),
        "{u:?}, attach at {before}"
    );
    assert!(
        u.memory_mib_seconds <= 32.0 * (elapsed + 0.002),
        "pool time billed: {} MiB-s in {elapsed} s",
        u.memory_mib_seconds
    );
    assert_eq!((u.calls, u.bytes_in, u.bytes_out), (0, 0, 0), "{u:?}");
    // Its boot and health probes in the pool (over a millisecond of vCPU
    // time) are not billed; at most part of a probe racing the attach is.
    assert!(u.vcpu_us < 300, "pool vCPU time billed: {u:?}");
    // The attach is an event for the new owner.
    let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("no event for the attach")
        .unwrap()
        .expect("watch ended");
    assert_eq!(ev.bubble_id, got.bubble_id);
    assert!(ev.reason.contains("attached"), "{ev:?}");
    // Billing runs from the attach on.
    burn(&mut c, &got.bubble_id).await;
    let u2 = usage(&mut c, &got.bubble_id).await;
    assert_eq!(u2.calls, 10);
    assert!(u2.vcpu_us > u.vcpu_us, "{u2:?} vs {u:?}");
}
