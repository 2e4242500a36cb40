//! One restore per frozen generation across brokers: two brokers share one
//! store (a local directory, then a real S3 server) and race three restores
//! each of the same suspended bubble. Exactly one wins, exactly one VM runs
//! it, the losers get FAILED_PRECONDITION (or the uniform not-accessible
//! answer once the copy is consumed) and start nothing.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use bubble_e2e_tests::moto::{http, s3_env, start_moto};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
const KEK: [u8; 32] = [0x5a; 32];

/// Races three restores on each broker; returns how many won.
async fn race(a: &Client, b: &Client, id: &str, generation: u64) -> usize {
    let mut all = Vec::new();
    for (c, g) in [(a, 0), (b, generation)] {
        for _ in 0..3 {
            let mut c = c.clone();
            let id = id.to_string();
            all.push(tokio::spawn(async move {
                c.restore_bubble(restore_req(&id, &KEK, g)).await
            }));
        }
    }
    let mut won = 0;
    for r in all {
        match r.await.unwrap() {
            Ok(b) => {
                assert_eq!(b.into_inner().state, READY);
                won += 1;
            }
            Err(st) => assert!(
                matches!(
                    st.code(),
                    Code::FailedPrecondition | Code::PermissionDenied | Code::DataLoss
                ),
                "a losing restore fails cleanly: {st:?}"
            ),
        }
    }
    won
}

async fn suspended_bubble(c: &mut Client) -> (String, u64) {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id;
    c.call(call_req(&id, "echo", b"state")).await.unwrap();
    let s = c
        .suspend_bubble(suspend_req(&id, &KEK))
        .await
        .unwrap()
        .into_inner();
    (id, s.generation)
}

/// Waits until the two brokers run `want` bubble VMs in all (one per
/// bubble restored so far).
async fn vms_in_all(dirs: [&Path; 2], want: usize) {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: usize = dirs.iter().map(|d| vmm_pids_under(d).len()).sum();
        if n == want {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{n} VMs run {want} bubbles"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_on_one_local_store_restore_a_copy_once() {
    let store = tempfile::tempdir().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), shared_store(store.path()));
    let b = BrokerProc::start_with(db.path(), shared_store(store.path()));
    let (mut ca, cb) = (a.client().await, b.client().await);
    for round in 1..=3 {
        let (id, generation) = suspended_bubble(&mut ca).await;
        assert_eq!(race(&ca, &cb, &id, generation).await, 1, "exactly one wins");
        vms_in_all([da.path(), db.path()], round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_on_one_s3_store_restore_a_copy_once() {
    let (moto, port) = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            return;
        }
    };
    let created = http(port, "PUT", "/claims").unwrap_or_default();
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let opts = || Opts {
        args: vec![
            "--store".into(),
            format!("s3://claims/shared?endpoint=http://127.0.0.1:{port}"),
        ],
        env: s3_env(),
        ..Default::default()
    };
    let a = BrokerProc::start_with(da.path(), opts());
    let b = BrokerProc::start_with(db.path(), opts());
    let (mut ca, cb) = (a.client().await, b.client().await);
    for round in 1..=2 {
        let (id, generation) = suspended_bubble(&mut ca).await;
        assert_eq!(race(&ca, &cb, &id, generation).await, 1, "exactly one wins");
        vms_in_all([da.path(), db.path()], round).await;
    }
    drop((a, b));
    drop(moto);
}
