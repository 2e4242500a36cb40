//! The typed control protocol end to end: a VMM's `ERROR` reply to a call
//! leaves the bubble READY (the caller gets INTERNAL), and failures are
//! counted once, under the kind the VMM side made (not a guess from text).
//! Needs the `fault-injection` feature of bubble-vmm (the tests crate's
//! dev-dependency enables it).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const FAILED: i32 = pb::BubbleState::Failed as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_error_reply_keeps_the_bubble_ready_and_failures_count_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);

    // The VMM answers this call with ERROR (as it does a malformed CALL).
    let op = bubble_vmm::process::FAULT_ERROR_OP;
    for _ in 0..3 {
        let e = c.call(call_req(&b.bubble_id, op, b"x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert!(e.message().contains("refused"), "{e:?}");
    }
    let now = c
        .describe_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, READY, "{}", now.failure_reason);
    assert!(now.failure_reason.is_empty(), "{}", now.failure_reason);
    let r = c
        .call(call_req(&b.bubble_id, "echo", b"still here"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().output, b"still here");
    // Every failure reason is exported from the start, at zero; so is the
    // build.
    let m = broker.admin_get("/metrics");
    assert!(
        m.contains(r#"bubbled_failures_total{reason="seccomp"} 0"#),
        "{m}"
    );
    assert!(nonzero_failures(&m).is_empty(), "{m}");
    assert!(m.contains("bubbled_build_info{version=\""), "{m}");

    // A real failure: the VMM is killed for a forbidden system call. It is
    // counted once, under its kind.
    let v = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let op = bubble_vmm::jail::seccomp::FAULT_OP;
    assert!(c.call(call_req(&v.bubble_id, op, b"")).await.is_err());
    let gone = wait_for(&mut c, &v.bubble_id, Duration::from_secs(10), |b| {
        b.state == FAILED
    })
    .await;
    assert_eq!(gone.state, FAILED);
    assert!(
        gone.failure_reason.contains("seccomp"),
        "{}",
        gone.failure_reason
    );
    // The record turns FAILED as the failure is applied; the counter
    // follows at once: wait for it (with a deadline that fails the test).
    let failures = nonzero_failures;
    let end = Instant::now() + Duration::from_secs(5);
    let mut m = broker.admin_get("/metrics");
    while failures(&m).is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = broker.admin_get("/metrics");
    }
    assert_eq!(
        failures(&m),
        vec![r#"bubbled_failures_total{reason="seccomp"} 1"#.to_string()],
        "{m}"
    );
}

/// The failure counters above zero.
fn nonzero_failures(m: &str) -> Vec<String> {
    m.lines()
        .filter(|l| l.starts_with("bubbled_failures_total{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}
