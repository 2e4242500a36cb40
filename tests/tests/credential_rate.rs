//! End to end on real KVM: the policy's `credential_rate`, enforced inside
//! the bubble on the host's clock. A portion hammering `hmac_sha256`
//! beyond the burst is refused (RESOURCE_EXHAUSTED, the guest's
//! RATE_LIMITED), its owner sees a `credential_rate` security event, the
//! count goes to Prometheus, another bubble is unaffected, the bucket
//! refills with time, and three refusals quarantine the module as any
//! other module strike does.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_client::Parent;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha384};
use tonic::Code;

/// `hammer`: uses credential `k` as many times as the input's first byte
/// says, in one call (so every use sees the same host time); returns 0.
const HAMMER: &str = r#"
(module
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "hmac_sha256" (func $hmac (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "k")
  (func (export "hammer") (result i32)
    (local $n i32)
    (drop (call $input_read (i32.const 16) (i32.const 1)))
    (local.set $n (i32.load8_u (i32.const 16)))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (if (i32.ne (call $hmac (i32.const 0) (i32.const 1) (i32.const 32) (i32.const 4) (i32.const 64))
                    (i32.const 0))
          (then (return (i32.const 1))))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $l)))
    (i32.const 0)))
"#;

const PER_SEC: u32 = 2;
const BURST: u32 = 5;

fn policy(rate: Option<(u32, u32)>) -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: rate.map(|(per_sec, burst)| pb::CredentialRate { per_sec, burst }),
        grants: vec![pb::CredentialGrant {
            portion: "hammer".into(),
            credentials: vec!["k".into()],
        }],
        ..Default::default()
    }
}

/// A bubble of `parent` under `policy(rate)` with `hammer` loaded and `k`
/// provisioned.
async fn hammer_bubble(parent: &Parent, rate: Option<(u32, u32)>) -> String {
    let b = parent
        .grpc()
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(policy(rate)),
            ..create_req(16)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, pb::BubbleState::Ready as i32, "{b:?}");
    let mut bubble = parent.bubble(&b.bubble_id);
    bubble
        .load_portion("hammer", &wat::parse_str(HAMMER).unwrap())
        .await
        .unwrap();
    bubble.trust_unverified().await.unwrap();
    bubble.provision("k", &[7; 32]).await.unwrap();
    b.bubble_id
}

async fn hammer(c: &mut Client, id: &str, n: u8) -> Result<(), tonic::Status> {
    c.call(pb::CallRequest {
        bubble_id: id.into(),
        op: "hammer".into(),
        portion: "hammer".into(),
        input: vec![n],
        ..Default::default()
    })
    .await
    .map(|_| ())
}

fn refused(r: Result<(), tonic::Status>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
    assert!(e.message().contains("rate"), "{what}: {e:?}");
}

fn counter(metrics: &str, kind: &str) -> Option<u64> {
    let key = format!("bubbled_security_events_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Receives events from `s` until `n` security events of `kind`; fails
/// after `limit`.
async fn expect_kind(
    s: &mut tonic::Streaming<pb::BubbleEvent>,
    kind: &str,
    n: usize,
    limit: Duration,
) -> Vec<pb::SecurityEvent> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("waited {limit:?} for {n} {kind}; got {got:?}"))
            .unwrap()
            .expect("stream open");
        if let Some(sec) = ev.security {
            if sec.kind == kind {
                got.push(sec);
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portion_beyond_its_credential_rate_is_refused_and_struck() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            ..Opts::default()
        },
    );
    let m = broker.admin_get("/metrics");
    assert_eq!(counter(&m, "credential_rate"), Some(0), "{m}");
    let a = Parent::from_client(broker.tls_client("parent-a").await);
    let b = Parent::from_client(broker.tls_client("parent-b").await);
    let mut ac = a.grpc();
    let mut bc = b.grpc();
    let mut a_events = ac
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut b_events = bc
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let digest: String = Sha384::digest(wat::parse_str(HAMMER).unwrap())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();

    let ida = hammer_bubble(&a, Some((PER_SEC, BURST))).await;
    let idb = hammer_bubble(&b, Some((PER_SEC, BURST))).await;
    let unlimited = hammer_bubble(&b, None).await;

    // The burst is allowed; one more than the burst in one call (one host
    // time, so no refill can happen between the uses) is refused whatever
    // the host's load.
    hammer(&mut ac, &ida, BURST as u8).await.unwrap();
    refused(hammer(&mut ac, &ida, BURST as u8 + 1).await, "burst + 1");
    let ev = expect_kind(&mut a_events, "credential_rate", 1, Duration::from_secs(10)).await;
    assert_eq!(ev[0].portion_digest, digest, "{ev:?}");
    assert_eq!(ev[0].parent, "cert:parent-a", "{ev:?}");

    // Another bubble (another parent's) has its own bucket: its burst is
    // whole. A policy without a rate has no limit.
    hammer(&mut bc, &idb, BURST as u8).await.unwrap();
    hammer(&mut bc, &unlimited, 200).await.unwrap();

    // The bucket refills with host time: after 3.5 s at 2/s (7 uses, cut
    // to the burst of 5) the burst is whole again; 2.5 s is the least that
    // refills it, so the margin is 1 s. (A sleep lets wall time pass for a
    // rate; the assertion is on the outcome.)
    tokio::time::sleep(Duration::from_millis(3500)).await;
    hammer(&mut ac, &ida, BURST as u8).await.unwrap();

    // Strikes: refusals count against the module like denied credentials.
    // The third quarantines it for parent A and fails its bubble.
    refused(hammer(&mut ac, &ida, BURST as u8 + 1).await, "strike 2");
    refused(hammer(&mut ac, &ida, BURST as u8 + 1).await, "strike 3");
    let failed = wait_for(&mut ac, &ida, Duration::from_secs(10), |x| {
        x.state == pb::BubbleState::Failed as i32
    })
    .await;
    assert!(
        failed
            .failure_reason
            .contains("quarantined after 3 credential_rate"),
        "{failed:?}"
    );
    expect_kind(&mut a_events, "credential_rate", 2, Duration::from_secs(10)).await;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let m = broker.admin_get("/metrics");
        if counter(&m, "credential_rate") == Some(3) {
            break;
        }
        assert!(Instant::now() < end, "counters: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Parent B was never struck and saw none of A's events; its bubble
    // still serves (its bucket refilled meanwhile).
    hammer(&mut bc, &idb, 1).await.unwrap();
    let d = describe(&mut bc, &idb).await;
    assert_eq!(d.state, pb::BubbleState::Ready as i32, "{d:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            let ev = b_events.message().await.unwrap().expect("stream open");
            if ev.security.is_some() {
                return ev;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "parent B got a security event: {quiet:?}");
}

/// The buckets are guest memory: a suspended and restored bubble does not
/// come back with a full bucket. At 1 use per second and a burst of 200,
/// refilling 200 uses takes 200 s, far beyond any suspend and restore here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_bubble_keeps_its_empty_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let parent = Parent::from_client(broker.client().await);
    let mut c = parent.grpc();
    let id = hammer_bubble(&parent, Some((1, 200))).await;
    let start = Instant::now();
    hammer(&mut c, &id, 200).await.unwrap();
    let s = c
        .suspend_bubble(suspend_req(&id, b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::BubbleState::Suspended as i32, "{s:?}");
    let r = c
        .restore_bubble(restore_req(&id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::BubbleState::Ready as i32, "{r:?}");
    // The restored bubble runs its portion, and its bucket is as it was
    // (plus at most the seconds that passed).
    hammer(&mut c, &id, 0).await.unwrap();
    refused(hammer(&mut c, &id, 200).await, "after restore");
    assert!(
        start.elapsed() < Duration::from_secs(150),
        "{:?}",
        start.elapsed()
    );
}
