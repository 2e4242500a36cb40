//! The hand-off step under a kill, real KVM: a trigger's worker waits, a
//! publish stores the event leased to it and hands it over; the broker is
//! SIGKILLed right then (fault point `event.taken`: the worker holds the
//! event, nothing has run). The publish was acknowledged, so the event
//! must survive: after a restart it comes back when its lease ends, runs
//! and has its one result (signed by the bubble), and is not run again.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const LIMIT: Duration = Duration::from_secs(30);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_handed_over_then_killed_runs_once_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Some("[events]\nack_wait_ms = 1500\n".to_string());
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: config.clone(),
            env: vec![("BUBBLED_TEST_PAUSE".into(), "event.taken=30000".into())],
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let bubble = bubble_with_portion(&mut c).await;
    let pk = sig_pk(&mut c, &bubble).await;
    let t = c
        .create_trigger(trigger_req("jobs", &bubble))
        .await
        .unwrap()
        .into_inner();
    // Acknowledged: durable from here on.
    assert!(publish(&mut c, "jobs", "k-1", b"k-1").await);
    reached(dir.path(), "event.taken").await;
    broker.kill();
    std::mem::forget(broker); // its VMMs belong to the next broker now

    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config,
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let r = results(&mut c, &t.trigger_id, &["k-1".to_string()], LIMIT).await;
    verify(&pk, &r[0], b"k-1");
    // Nothing else was signed in the bubble since that run: the next
    // signed call is the very next of its counter (no second run of the
    // event after the result).
    let next = c
        .call(pb::CallRequest {
            bubble_id: bubble.clone(),
            op: "echo".into(),
            portion: "ev".into(),
            input: b"after".to_vec(),
            sign: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.call_id, r[0].call_id + 1, "the event ran again");
}
