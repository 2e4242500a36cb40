//! A broker killed at each step of a suspend leaves either a running
//! bubble or a complete frozen copy that the registry points at, never a
//! lost bubble: the frozen copy is durable before the registry says
//! SUSPENDED, and the VMM stops only after that commit. The steps are
//! reached through the test-only fault points of the `fault-injection`
//! feature; the test kills the broker once its log says the point is
//! reached.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;

/// Waits until the broker's log shows it paused at `point`.
async fn reached(dir: &Path, point: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains("fault point reached") && l.contains(point))
        {
            return;
        }
        assert!(Instant::now() < until, "the broker never reached {point}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The bubble's public keys: made inside it, so they name its state.
async fn keys(c: &mut Client, id: &str) -> Vec<u8> {
    c.call(call_req(id, "keys", b""))
        .await
        .unwrap()
        .into_inner()
        .output
}

/// Kills the broker paused at `point` during a suspend; returns the data
/// dir (kept), the bubble and its keys.
async fn kill_at(point: &str) -> (tempfile::TempDir, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: vec![("BUBBLED_TEST_PAUSE".into(), format!("{point}=30000"))],
            ..Default::default()
        },
    );
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id;
    let before = keys(&mut c, &id).await;
    let mut s = c.clone();
    let sid = id.clone();
    let suspend = tokio::spawn(async move { s.suspend_bubble(suspend_req(&sid, b"")).await });
    reached(dir.path(), point).await;
    broker.kill();
    assert!(
        suspend.await.unwrap().is_err(),
        "the broker died mid-suspend"
    );
    std::mem::forget(broker); // its VMMs belong to the next broker now
    (dir, id, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_copy_is_stored_the_bubble_runs_on() {
    let (dir, id, before) = kill_at("suspend.stored").await;
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = wait_for(&mut c, &id, Duration::from_secs(10), |b| b.state == READY).await;
    assert_eq!(b.state, READY, "re-adopted: {}", b.failure_reason);
    assert_eq!(keys(&mut c, &id).await, before, "the same bubble");
    // And it can be suspended and restored normally afterwards.
    suspend_and_restore(&mut c, &id).await;
    assert_eq!(keys(&mut c, &id).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_commit_the_copy_restores() {
    let (dir, id, before) = kill_at("suspend.committed").await;
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c
        .describe_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, SUSPENDED, "{}", b.failure_reason);
    // The VMM the dead broker had not stopped yet is stopped now.
    assert!(no_vmms_within(dir.path(), Duration::from_secs(10)).await);
    let r = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY);
    assert_eq!(keys(&mut c, &id).await, before, "the same bubble");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_stored_but_not_committed_cannot_be_imported_elsewhere() {
    const KEK: [u8; 32] = [9; 32];
    let store = tempfile::tempdir().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let opts = |pause: bool| Opts {
        args: vec!["--store".into(), store.path().display().to_string()],
        env: if pause {
            vec![("BUBBLED_TEST_PAUSE".into(), "suspend.stored=30000".into())]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let mut a = BrokerProc::start_with(da.path(), opts(true));
    let mut c = a.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id;
    let mut s = c.clone();
    let sid = id.clone();
    let suspend = tokio::spawn(async move { s.suspend_bubble(suspend_req(&sid, &KEK)).await });
    reached(da.path(), "suspend.stored").await;
    a.kill();
    assert!(suspend.await.unwrap().is_err());
    std::mem::forget(a);
    // The copy of generation 1 is complete in the store, but never
    // recorded: another broker cannot take it.
    let other = BrokerProc::start_with(db.path(), opts(false));
    let mut cb = other.client().await;
    let st = cb
        .restore_bubble(restore_req(&id, &KEK, 1))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    // The first broker runs the bubble on, and its next suspend (same
    // generation) replaces the leftover copy; committed, it can move.
    let a = BrokerProc::start_with(da.path(), opts(false));
    let mut c = a.client().await;
    let b = wait_for(&mut c, &id, Duration::from_secs(10), |b| b.state == READY).await;
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    let s = c.suspend_bubble(suspend_req(&id, &KEK)).await.unwrap();
    assert_eq!(s.into_inner().generation, 1);
    let r = cb.restore_bubble(restore_req(&id, &KEK, 1)).await.unwrap();
    assert_eq!(r.into_inner().state, READY);
}
