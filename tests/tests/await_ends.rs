//! How an await ends besides its event and its timeout, on real KVM: a
//! broker killed after restoring an await's bubble but before RESUME
//! finishes the call once restarted (two brokers on one local store and
//! on one moto store); deleting an awaiting bubble ends its await with a
//! typed failure for its origin; restoring it (`RestoreBubble`) times the
//! pending call out at once and publishes its answer; an event on an
//! ended await's key gets a typed failure.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// Broker B takes the capture event, restores the bubble A froze, and is
/// SIGKILLed right there (fault point `await.restored`: the copy is
/// consumed, the bubble runs on B with its call pending, no RESUME sent).
/// Restarted, B re-adopts the bubble, the unacked event comes back (2 s
/// ack wait) and B resumes the call it finds running: one signed result,
/// the original call's.
async fn killed_between_restore_and_resume(s3: bool) {
    let Some(mut p) = pair_on(
        s3,
        [None, Some("await.restored=60000")],
        "[events]\nack_wait_ms = 2000\n",
    ) else {
        return;
    };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    trigger(&mut a, "pay", &bubble, "pay").await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &b_bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-9", b"cap-9").await);
    wait_frozen(&mut a, p.dirs[0].path(), &bubble).await;
    assert!(publish(&mut b, "pay", "cap-9", b"captured-900").await);
    log_line(p.dirs[1].path(), &["fault point reached", "await.restored"]).await;
    p.brokers[1].kill();
    // The bubble runs on B's side (its VMM outlives the broker), restored
    // and not resumed; A runs nothing (the copy is consumed).
    assert!(vmm_pids_under(p.dirs[0].path()).is_empty());
    // Its VMMs belong to the restarted broker now (dropping the old
    // handle would kill them).
    let old = std::mem::replace(
        &mut p.brokers[1],
        BrokerProc::start_with(p.dirs[1].path(), p.opts.clone()),
    );
    std::mem::forget(old);
    let mut b = p.brokers[1].client().await;
    let r = wait_result_in(&mut b, &tb, "order-9", LIMIT, Some(p.dirs[1].path())).await;
    verify(&pk, &r, "pay", b"cap-9", b"cap-9|captured-900");
    assert_eq!(r.bubble_id, bubble);
    // The resuming event has the same answer; the bubble takes calls on B.
    let rc = wait_result(&mut b, &tb, "cap-9", LIMIT).await;
    assert_eq!(rc.output, r.output);
    assert_eq!(describe(&mut b, &bubble).await.state, READY);
    b.call(call_req(&bubble, "echo", b"hi"))
        .await
        .expect("a call after the resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_between_restore_and_resume_finishes_the_call_local_store() {
    killed_between_restore_and_resume(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_between_restore_and_resume_finishes_the_call_moto_store() {
    killed_between_restore_and_resume(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_awaiting_bubble_ends_its_await_with_a_typed_failure() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let t = trigger(&mut a, "pay", &bubble, "pay").await;
    assert!(publish(&mut a, "pay", "order-10", b"cap-10").await);
    wait_frozen(&mut a, dir.path(), &bubble).await;
    assert_eq!(result(&mut a, &t, "order-10").await.outcome, "pending");

    a.delete_bubble(pb::BubbleRef {
        bubble_id: bubble.clone(),
    })
    .await
    .expect("delete");
    // The origin gets its result: a failure saying why, at once.
    let r = result(&mut a, &t, "order-10").await;
    assert_eq!(r.outcome, "failed", "{r:?}");
    assert!(
        r.reason.contains("was deleted before its call was resumed"),
        "{r:?}"
    );
    // The await ended: the awaited key's event resumes nothing and is
    // told so.
    assert!(publish(&mut a, "pay", "cap-10", b"captured").await);
    let late = wait_result(&mut a, &t, "cap-10", LIMIT).await;
    assert_eq!(late.outcome, "failed", "{late:?}");
    assert!(late.reason.contains("has ended"), "{late:?}");
    assert!(
        no_vmms_within(dir.path(), LIMIT).await,
        "a VMM runs for a deleted bubble"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_awaiting_bubble_times_its_call_out_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let t = trigger(&mut a, "pay", &bubble, "pay").await;
    assert!(publish(&mut a, "pay", "order-11", b"cap-11").await);
    wait_frozen(&mut a, dir.path(), &bubble).await;

    let started = std::time::Instant::now();
    let rec = a
        .restore_bubble(pb::RestoreBubbleRequest {
            bubble_id: bubble.clone(),
            ..Default::default()
        })
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(rec.state, READY, "{rec:?}");
    // The portion saw the timeout (its await is 60 s: this is not it),
    // and its answer is the origin's result by the time the restore
    // answered.
    let r = result(&mut a, &t, "order-11").await;
    verify(&pk, &r, "pay", b"cap-11", b"cap-11|timeout");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The await ended: its key's event resumes nothing.
    assert!(publish(&mut a, "pay", "cap-11", b"captured").await);
    let late = wait_result(&mut a, &t, "cap-11", LIMIT).await;
    assert_eq!(late.outcome, "failed", "{late:?}");
    a.call(call_req(&bubble, "echo", b"hi"))
        .await
        .expect("the restored bubble takes calls");
}

/// A direct call's await that times out: its answer is kept, and its
/// owner reads it with `GetAwaitResult` (pending before); another parent,
/// or an unknown key, gets PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_direct_await_keeps_its_answer_for_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    signed_await(&mut a, &bubble, "pay_short", "cap-16").await;
    let get = |c: &mut Client, key: &str| {
        let mut c = c.clone();
        let key = key.to_string();
        async move {
            c.get_await_result(pb::GetAwaitResultRequest { key })
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = get(&mut a, "cap-16").await.expect("get await result");
    assert_eq!(first.outcome, "pending", "{first:?}");
    // Nobody else's, and no unknown key.
    for (c, key) in [(&mut b, "cap-16"), (&mut a, "cap-none")] {
        let e = get(c, key).await.expect_err("not theirs");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    // After the 1.5 s timeout: the signed answer, `key|timeout`.
    let end = std::time::Instant::now() + LIMIT;
    let r = loop {
        let r = get(&mut a, "cap-16").await.expect("get await result");
        if r.outcome != "pending" {
            break r;
        }
        assert!(std::time::Instant::now() < end, "no answer kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.bubble_id, bubble);
    verify(&pk, &r, "pay_short", b"cap-16", b"cap-16|timeout");
    let e = get(&mut b, "cap-16").await.expect_err("not theirs");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}
