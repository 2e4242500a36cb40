//! End to end on real KVM: strike counts and throttles are kept in the
//! registry, so a hostile parent or module cannot reset its count by
//! waiting for, or causing, a broker restart (here: SIGKILL, the worst
//! case, with no chance to flush anything).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

/// One credential the hostile portion was not granted: a strike.
async fn steal(c: &mut Client, id: &str) {
    let e = c
        .call(pb::CallRequest {
            bubble_id: id.to_string(),
            op: "steal".into(),
            portion: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

/// One id of another (or no) bubble: a refusal counted against the parent.
async fn probe(c: &mut Client, i: u64) -> tonic::Status {
    let id = format!("b-{:032x}", 0xbad0_0000u64 + i);
    c.describe_bubble(pb::BubbleRef { bubble_id: id })
        .await
        .unwrap_err()
}

/// N−1 strikes of a module and N−1 refusals of a probing parent, SIGKILL,
/// restart, one more of each: the module is quarantined (its bubble
/// FAILED, its loads refused) and the parent throttled, exactly as without
/// the restart. (That the windows still expire across a restart is shown
/// with a controlled clock in `core::ledger`'s unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strikes_and_throttles_survive_a_broker_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let mut m = broker.tls_client("parent-b").await;
    let id = payments::hostile_bubble(&mut a).await;
    payments::load_hostile(&mut a, &id).await.unwrap();
    // Defaults: 3 strikes of a kind quarantine; 10 refusals throttle.
    for _ in 0..2 {
        steal(&mut a, &id).await;
    }
    for i in 0..9 {
        let e = probe(&mut m, i).await;
        assert_eq!(e.code(), Code::PermissionDenied, "{i}: {e:?}");
    }
    assert_eq!(
        describe(&mut a, &id).await.state,
        pb::BubbleState::Ready as i32
    );

    drop((a, m));
    broker.kill();
    let broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let mut m = broker.tls_client("parent-b").await;

    // The parent: its tenth refusal throttles it.
    let e = probe(&mut m, 9).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = m
        .list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // The module: its third strike (in the re-adopted bubble) quarantines.
    steal(&mut a, &id).await;
    let failed = wait_for(&mut a, &id, Duration::from_secs(5), |b| {
        b.state == pb::BubbleState::Failed as i32
    })
    .await;
    assert!(
        failed
            .failure_reason
            .contains("quarantined after 3 credential_denied"),
        "{failed:?}"
    );
    let other = payments::hostile_bubble(&mut a).await;
    let e = payments::load_hostile(&mut a, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("quarantined"), "{e:?}");
}
