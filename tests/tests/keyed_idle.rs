//! End to end on real KVM: the idle policy never seals a bubble whose
//! parent keeps its frozen copies under its own key with the broker's key.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;

fn idle_suspend(timeout_s: u32) -> pb::CreateBubbleRequest {
    let mut req = create_req(8);
    req.idle = Some(pb::IdlePolicy {
        idle_timeout_s: timeout_s,
        action: pb::IdleAction::Suspend as i32,
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_suspend_keeps_a_parent_keyed_bubble_running() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let kek = [0x42u8; 32];
    // The parent suspends under its own key and restores: the bubble
    // is READY again with an idle policy that suspends.
    let keyed = c
        .create_bubble(idle_suspend(2))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let s = c
        .suspend_bubble(suspend_req(&keyed, &kek))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, SUSPENDED);
    let r = c
        .restore_bubble(restore_req(&keyed, &kek, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY);
    // A bubble created after that restore, with the same policy, falls
    // idle later than the keyed one: once the broker has suspended it,
    // the keyed one was due (and passed over) before.
    let plain = c
        .create_bubble(idle_suspend(2))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let p = wait_for(&mut c, &plain, Duration::from_secs(20), |b| {
        b.state == SUSPENDED
    })
    .await;
    assert_eq!(p.state, SUSPENDED, "the idle policy ran");
    let k = describe(&mut c, &keyed).await;
    assert_eq!(k.state, READY, "a parent-keyed bubble was idle-suspended");
    // Nothing under the keyed bubble in the store, and it still answers.
    let frozen = dir.path().join("store/frozen").join(&keyed);
    let objects = std::fs::read_dir(&frozen).map(|d| d.count()).unwrap_or(0);
    assert_eq!(objects, 0, "a copy of the keyed bubble was stored");
    let out = c
        .call(call_req(&keyed, "echo", b"awake"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"awake");
    // Its parent can still suspend it, under its key.
    let s = c
        .suspend_bubble(suspend_req(&keyed, &kek))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, SUSPENDED);
}
