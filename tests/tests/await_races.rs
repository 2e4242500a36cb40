//! Races on one await, on real KVM: two events on the same key read the
//! await as FROZEN at once; the first resumes it and its answer is kept;
//! the second, taking the await after the first ended it, must not send
//! RESUME to the (now idle) bubble nor replace the kept answer. And a
//! bubble restored after a crash on another broker than the freezer,
//! then deleted, ends its await (two brokers, local store and moto).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

/// Fault points: every event pauses 8 s between reading its await and
/// taking it (`await.read`), and the resuming one 1.5 s after restoring
/// the bubble (`await.restored`). Event 1 takes the await; event 2 (on a
/// second trigger, same key) is published while event 1 is paused
/// after the restore, so it reads the await FROZEN and takes it only
/// after event 1 resumed the call and ended the await.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_event_on_a_resumed_key_keeps_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: vec![(
                "BUBBLED_TEST_PAUSE".into(),
                "await.read=8000,await.restored=1500".into(),
            )],
            ..Default::default()
        },
    );
    let mut a = broker.client().await;
    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    // A direct call awaits key cap-30 (60 s): its answer is kept.
    signed_await(&mut a, &bubble, "pay", "cap-30").await;
    wait_frozen(&mut a, dir.path(), &bubble).await;
    let other = await_bubble(&mut a).await;
    let t1 = trigger(&mut a, "pay", &other, "pay").await;
    let t2 = trigger(&mut a, "pay2", &other, "pay").await;

    assert!(publish(&mut a, "pay", "cap-30", b"captured-1").await);
    log_line(dir.path(), &["fault point reached", "await.restored"]).await;
    assert!(publish(&mut a, "pay2", "cap-30", b"captured-2").await);

    let get = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get_await_result(pb::GetAwaitResultRequest {
                key: "cap-30".into(),
            })
            .await
            .expect("get await result")
            .into_inner()
        }
    };
    let end = Instant::now() + LIMIT;
    let first = loop {
        let r = get(&mut a).await;
        if r.outcome != "pending" {
            break r;
        }
        assert!(Instant::now() < end, "no answer kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    verify(&pk, &first, "pay", b"cap-30", b"cap-30|captured-1");
    let r1 = wait_result(&mut a, &t1, "cap-30", LIMIT).await;
    assert_eq!(r1.outcome, "ok", "{r1:?}");
    // Event 2 took the await after it ended: it is told so, and resumes
    // nothing.
    let r2 = wait_result_in(&mut a, &t2, "cap-30", LIMIT, Some(dir.path())).await;
    assert_eq!(r2.outcome, "failed", "{r2:?}");
    assert!(r2.reason.contains("has ended"), "{r2:?}");
    // The kept answer is still the first one.
    let kept = get(&mut a).await;
    verify(&pk, &kept, "pay", b"cap-30", b"cap-30|captured-1");
    let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert!(
        !log.contains("restored and not resumed"),
        "RESUME was sent to a bubble whose await had ended:\n{log}"
    );
    a.call(call_req(&bubble, "echo", b"hi"))
        .await
        .expect("the bubble takes calls");
}

/// Broker B restores the bubble A froze and is SIGKILLed before RESUME
/// (`await.restored`); restarted, B runs the bubble (re-adopted, READY,
/// call pending) while the await is FROZEN in the index and only in A's
/// registry. The owner deletes the bubble on B before the event comes
/// back (60 s ack wait): the await must end (origin told "deleted"), not
/// stay FROZEN forever.
async fn deleting_a_bubble_restored_after_a_crash(s3: bool) {
    let Some(mut p) = pair_on(
        s3,
        [None, Some("await.restored=60000")],
        "[events]\nack_wait_ms = 60000\n",
    ) else {
        return;
    };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let bubble = await_bubble(&mut a).await;
    trigger(&mut a, "pay", &bubble, "pay").await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = trigger(&mut b, "pay", &b_bubble, "pay").await;

    assert!(publish(&mut a, "pay", "order-31", b"cap-31").await);
    wait_frozen(&mut a, p.dirs[0].path(), &bubble).await;
    assert!(publish(&mut b, "pay", "cap-31", b"captured").await);
    log_line(p.dirs[1].path(), &["fault point reached", "await.restored"]).await;
    p.brokers[1].kill();
    let old = std::mem::replace(
        &mut p.brokers[1],
        BrokerProc::start_with(p.dirs[1].path(), p.opts.clone()),
    );
    std::mem::forget(old);
    let mut b = p.brokers[1].client().await;
    assert_eq!(
        describe(&mut b, &bubble).await.state,
        pb::BubbleState::Ready as i32
    );
    b.delete_bubble(pb::BubbleRef {
        bubble_id: bubble.clone(),
    })
    .await
    .expect("delete");
    // The origin's result (published on B, relayed to A) says why.
    let r = wait_result_in(&mut b, &tb, "order-31", LIMIT, Some(p.dirs[1].path())).await;
    assert_eq!(r.outcome, "failed", "{r:?}");
    assert!(
        r.reason.contains("was deleted before its call was resumed"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_bubble_restored_after_a_crash_ends_its_await_local_store() {
    deleting_a_bubble_restored_after_a_crash(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_bubble_restored_after_a_crash_ends_its_await_moto_store() {
    deleting_a_bubble_restored_after_a_crash(true).await;
}
