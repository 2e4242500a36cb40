//! The lifecycle under attack, end to end on real KVM: operations racing on
//! one bubble (calls against suspend and delete, concurrent restores),
//! suspend/restore cycles with both cores loaded, and a broker killed while
//! restores run. Every operation on a bubble holds the bubble's permit, so
//! each of these must end in a state the lifecycle allows, with exactly
//! one VM per running bubble and none for the others.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
const BUSY: i32 = pb::BubbleState::Busy as i32;
const SUSPENDED: i32 = pb::BubbleState::Suspended as i32;
const DELETED: i32 = pb::BubbleState::Deleted as i32;

/// A call that keeps the guest busy for a while (`rounds` SHA-256s).
fn long_call(id: &str, rounds: u32) -> pb::CallRequest {
    let mut input = rounds.to_le_bytes().to_vec();
    input.extend(b"busy");
    call_req(id, "sha256_chain", &input)
}

async fn create(c: &mut Client) -> String {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    b.bubble_id
}

async fn describe(c: &mut Client, id: &str) -> pb::Bubble {
    c.describe_bubble(pb::BubbleRef {
        bubble_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// VMMs that run a bubble (not idle spares) for the broker on `dir`.
fn bubble_vmms(dir: &std::path::Path) -> usize {
    vmm_pids_under(dir).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_racing_a_suspend_leave_it_suspended_and_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    for round in 0..5 {
        // One call is running when the suspend arrives; more calls arrive
        // with and after it and queue behind one or the other.
        let mut first = c.clone();
        let running = tokio::spawn({
            let id = id.clone();
            async move { first.call(long_call(&id, 1_000_000)).await }
        });
        wait_for(&mut c, &id, Duration::from_secs(10), |b| b.state == BUSY).await;
        let mut s = c.clone();
        let suspend = tokio::spawn({
            let id = id.clone();
            async move { s.suspend_bubble(suspend_req(&id, b"")).await }
        });
        let mut late = Vec::new();
        for _ in 0..6 {
            let mut cc = c.clone();
            let id = id.clone();
            late.push(tokio::spawn(async move {
                cc.call(call_req(&id, "echo", b"late")).await
            }));
        }
        let r = running.await.unwrap();
        assert!(r.is_ok(), "round {round}: the running call finishes: {r:?}");
        let s = suspend.await.unwrap().expect("suspend succeeds");
        assert_eq!(s.into_inner().state, SUSPENDED);
        for l in late {
            match l.await.unwrap() {
                Ok(r) => assert_eq!(r.into_inner().output, b"late"),
                Err(st) => assert_eq!(
                    st.code(),
                    Code::FailedPrecondition,
                    "round {round}: a call behind the suspend is refused, nothing else: {st:?}"
                ),
            }
        }
        let b = describe(&mut c, &id).await;
        assert_eq!(b.state, SUSPENDED, "round {round}: {}", b.failure_reason);
        assert!(no_vmms_within(dir.path(), Duration::from_secs(10)).await);
        let r = c
            .restore_bubble(restore_req(&id, b"", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.state, READY);
        let out = c.call(call_req(&id, "echo", b"after")).await.unwrap();
        assert_eq!(out.into_inner().output, b"after");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_restores_run_exactly_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    for _ in 0..3 {
        c.suspend_bubble(suspend_req(&id, b"")).await.unwrap();
        assert!(no_vmms_within(dir.path(), Duration::from_secs(10)).await);
        let mut all = Vec::new();
        for _ in 0..6 {
            let mut cc = c.clone();
            let id = id.clone();
            all.push(tokio::spawn(async move {
                cc.restore_bubble(restore_req(&id, b"", 0)).await
            }));
        }
        let mut won = 0;
        for r in all {
            match r.await.unwrap() {
                Ok(b) => {
                    assert_eq!(b.into_inner().state, READY);
                    won += 1;
                }
                Err(st) => assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}"),
            }
        }
        assert_eq!(won, 1, "exactly one restore wins");
        // The losers started no VMM: one runs, and stays the only one.
        wait_bubble_vmms(dir.path(), 1, Duration::from_secs(10)).await;
        let out = c.call(call_req(&id, "echo", b"one")).await.unwrap();
        assert_eq!(out.into_inner().output, b"one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_racing_a_delete_ends_deleted_with_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    for _ in 0..4 {
        let id = create(&mut c).await;
        let mut first = c.clone();
        let running = tokio::spawn({
            let id = id.clone();
            async move { first.call(long_call(&id, 1_000_000)).await }
        });
        wait_for(&mut c, &id, Duration::from_secs(10), |b| b.state == BUSY).await;
        let mut d = c.clone();
        let delete = tokio::spawn({
            let id = id.clone();
            async move { d.delete_bubble(pb::BubbleRef { bubble_id: id }).await }
        });
        let mut late = c.clone();
        let after = tokio::spawn({
            let id = id.clone();
            async move { late.call(call_req(&id, "echo", b"x")).await }
        });
        assert!(
            running.await.unwrap().is_ok(),
            "the running call finishes first"
        );
        let d = delete.await.unwrap().expect("delete succeeds");
        assert_eq!(d.into_inner().state, DELETED);
        if let Err(st) = after.await.unwrap() {
            assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        }
        assert_eq!(describe(&mut c, &id).await.state, DELETED);
        let st = c.call(call_req(&id, "echo", b"x")).await.unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition);
    }
    assert!(no_vmms_within(dir.path(), Duration::from_secs(10)).await);
}

/// Spins on one core until dropped.
struct Hog(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Hog {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            let mut x = 0u64;
            while !s.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        Self(stop, Some(h))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_suspend_restore_call_cycles_with_both_cores_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = create(&mut c).await;
    let _hogs = (Hog::start(), Hog::start());
    let started = Instant::now();
    for cycle in 0..200u32 {
        let s = c.suspend_bubble(suspend_req(&id, b"")).await;
        let s = s.unwrap_or_else(|e| panic!("cycle {cycle}: suspend: {e:?}"));
        assert_eq!(s.into_inner().state, SUSPENDED, "cycle {cycle}");
        let r = c.restore_bubble(restore_req(&id, b"", 0)).await;
        let r = r.unwrap_or_else(|e| panic!("cycle {cycle}: restore: {e:?}"));
        assert_eq!(r.into_inner().state, READY, "cycle {cycle}");
        let msg = cycle.to_le_bytes();
        let out = c.call(call_req(&id, "echo", &msg)).await;
        let out = out.unwrap_or_else(|e| panic!("cycle {cycle}: call: {e:?}"));
        assert_eq!(out.into_inner().output, msg);
        let b = describe(&mut c, &id).await;
        assert_eq!(b.state, READY, "cycle {cycle}: {}", b.failure_reason);
        assert_eq!(b.generation, u64::from(cycle) + 1);
    }
    eprintln!("200 loaded cycles in {:?}", started.elapsed());
    // Every suspended VMM exits: one VM for the one bubble.
    wait_bubble_vmms(dir.path(), 1, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_during_restores_leaves_no_stray_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = create(&mut c).await;
        c.suspend_bubble(suspend_req(&id, b"")).await.unwrap();
        ids.push(id);
    }
    assert!(no_vmms_within(dir.path(), Duration::from_secs(10)).await);
    for id in &ids {
        let mut cc = c.clone();
        let id = id.clone();
        tokio::spawn(async move { cc.restore_bubble(restore_req(&id, b"", 0)).await });
    }
    // Kill it as soon as the first restore has a VMM of its own.
    let until = Instant::now() + Duration::from_secs(20);
    while bubble_vmms(dir.path()) == 0 {
        assert!(Instant::now() < until, "no restore started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    broker.kill();
    drop(c);
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    // Every bubble is READY (its restore finished before the kill and the
    // VMM was re-adopted) or SUSPENDED (and restorable); every VMM left
    // belongs to a READY bubble.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ready = 0;
        for id in &ids {
            let b = describe(&mut c, id).await;
            assert!(
                b.state == READY || b.state == SUSPENDED,
                "{id}: {} {}",
                b.state,
                b.failure_reason
            );
            ready += usize::from(b.state == READY);
        }
        if bubble_vmms(dir.path()) == ready {
            break;
        }
        assert!(
            Instant::now() < until,
            "{} VMMs for {ready} running bubbles after the restart",
            bubble_vmms(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        if describe(&mut c, id).await.state == SUSPENDED {
            let r = c.restore_bubble(restore_req(id, b"", 0)).await.unwrap();
            assert_eq!(r.into_inner().state, READY);
        }
        let out = c.call(call_req(id, "echo", b"alive")).await.unwrap();
        assert_eq!(out.into_inner().output, b"alive");
    }
    wait_bubble_vmms(dir.path(), ids.len(), Duration::from_secs(10)).await;
}
