//! End to end on real KVM: security events (typed, streamed to the owner
//! only, counted by kind) and the audit log (a parent sees its own
//! records; the chain verifies offline and a one-byte edit is named).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use sha2::{Digest, Sha384};
use tonic::Code;

const HOSTILE: &str = include_str!("../../examples/payments/hostile.wat");

const KINDS: [&str; 13] = [
    "credential_denied",
    "credential_rate",
    "host_call_forbidden",
    "fuel_exhausted",
    "memory_limit",
    "deadline_kill",
    "guest_abi_violation",
    "seccomp_kill",
    "foreign_attestation",
    "foreign_access",
    "probing",
    "restore_wrong_key",
    "dead_letter",
];

fn counter(metrics: &str, kind: &str) -> Option<u64> {
    let key = format!("bubbled_security_events_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Receives security events from `s` until one of each of `kinds` came
/// (in any order, other events skipped); fails the test after `limit`.
async fn expect_security(
    s: &mut tonic::Streaming<pb::BubbleEvent>,
    kinds: &[&str],
    limit: Duration,
) -> Vec<pb::BubbleEvent> {
    let end = Instant::now() + limit;
    let mut got: Vec<pb::BubbleEvent> = Vec::new();
    while kinds
        .iter()
        .any(|k| !got.iter().any(|e| e.security.as_ref().unwrap().kind == *k))
    {
        let left = end.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("waited {limit:?} for {kinds:?}; got {got:?}"))
            .unwrap()
            .expect("stream open");
        if ev.security.is_some() {
            got.push(ev);
        }
    }
    got
}

fn ctl(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(ctl_bin())
        .arg("--socket")
        .arg(dir.join("bubbled.sock"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_reach_the_owner_and_the_audit_chain_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            ..Opts::default()
        },
    );
    // Every kind is exported at zero from the start.
    let m = broker.admin_get("/metrics");
    for k in KINDS {
        assert_eq!(counter(&m, k), Some(0), "{k}: {m}");
    }
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let mut a_events = a
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut b_events = b
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // A bubble of A with a policy, a hostile portion and a credential.
    let policy = pb::SecurityPolicy {
        credential_rate: None,
        fuel_per_call: 2_000_000,
        memory_limit_bytes: 1 << 20,
        call_deadline_ms: 2000,
        max_output_bytes: 16 << 10,
        grants: vec![pb::CredentialGrant {
            portion: "hostile".into(),
            credentials: vec![],
        }],
    };
    let bub = a
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(policy),
            ..create_req(16)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bub.state, pb::BubbleState::Ready as i32);
    let id = bub.bubble_id.clone();
    let module = wat::parse_str(HOSTILE).unwrap();
    let digest: String = Sha384::digest(&module)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    a.load_portion(pb::LoadPortionRequest {
        bubble_id: id.clone(),
        name: "hostile".into(),
        module,
    })
    .await
    .unwrap();
    for (f, code) in [
        ("steal", Code::PermissionDenied),
        ("spin", Code::ResourceExhausted),
        ("grow", Code::ResourceExhausted),
    ] {
        let e = a
            .call(pb::CallRequest {
                bubble_id: id.clone(),
                op: f.into(),
                portion: "hostile".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{f}: {e:?}");
    }
    // An HMAC of a credential never provisioned: audited as a failed use.
    let mut h = vec![4u8];
    h.extend(b"nope");
    h.extend(b"data-never-logged");
    assert!(a.call(call_req(&id, "hmac", &h)).await.is_err());

    // B probes A's bubble and an id that does not exist: the same answer.
    let ghost = "b-0123456789abcdef0123456789abcdef";
    for target in [id.as_str(), ghost] {
        let e = b
            .describe_bubble(pb::BubbleRef {
                bubble_id: target.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = b
            .get_attestation(pb::GetAttestationRequest {
                bubble_id: target.into(),
                nonce: vec![7; 32],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }

    // A sees each event, typed, with the portion's digest where known and
    // without B's identity.
    let got = expect_security(
        &mut a_events,
        &[
            "credential_denied",
            "fuel_exhausted",
            "memory_limit",
            "foreign_access",
            "foreign_attestation",
        ],
        Duration::from_secs(10),
    )
    .await;
    for ev in &got {
        let s = ev.security.as_ref().unwrap();
        assert_eq!(ev.bubble_id, id);
        match s.kind.as_str() {
            "foreign_access" | "foreign_attestation" => {
                assert_eq!(s.parent, "(another parent)");
                assert_eq!(s.portion_digest, "");
            }
            _ => {
                assert_eq!(s.portion_digest, digest, "{ev:?}");
                assert_eq!(s.parent, "cert:parent-a");
            }
        }
    }
    // Counted by kind.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let m = broker.admin_get("/metrics");
        let ok = counter(&m, "credential_denied") == Some(1)
            && counter(&m, "fuel_exhausted") == Some(1)
            && counter(&m, "memory_limit") == Some(1)
            && counter(&m, "foreign_access") == Some(2)
            && counter(&m, "foreign_attestation") == Some(2);
        if ok {
            break;
        }
        assert!(Instant::now() < end, "counters: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A hostile guest fails alone: a deadline kill, and the VMM killed by
    // its seccomp filter.
    let spin = a
        .create_bubble(pb::CreateBubbleRequest {
            image: "test:spin".into(),
            ..create_req(8)
        })
        .await
        .unwrap()
        .into_inner();
    let mut req = call_req(&spin.bubble_id, "echo", b"x");
    req.deadline_ms = 300;
    assert!(a.call(req).await.is_err());
    let sc = a.create_bubble(create_req(16)).await.unwrap().into_inner();
    let op = bubble_vmm::jail::seccomp::FAULT_OP;
    assert!(a.call(call_req(&sc.bubble_id, op, b"")).await.is_err());
    let got = expect_security(
        &mut a_events,
        &["deadline_kill", "seccomp_kill"],
        Duration::from_secs(10),
    )
    .await;
    let by_kind = |k: &str| got.iter().find(|e| e.security.as_ref().unwrap().kind == k);
    assert_eq!(by_kind("deadline_kill").unwrap().bubble_id, spin.bubble_id);
    assert_eq!(by_kind("seccomp_kill").unwrap().bubble_id, sc.bubble_id);

    // B's watch stream never carried anything of A's.
    let quiet = tokio::time::timeout(Duration::from_millis(200), b_events.message()).await;
    assert!(quiet.is_err(), "B saw {quiet:?}");

    // Audit: A sees its lifecycle, credential and security records; B
    // sees only its own four refused requests, the same for both ids.
    let a_audit = a
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let has = |t: &str, f: &dyn Fn(&pb::AuditRecord) -> bool| {
        a_audit.iter().any(|r| r.r#type == t && f(r))
    };
    assert!(has("lifecycle", &|r| r.bubble_id == id && r.state == "READY"));
    assert!(has("credential", &|r| r.credential_action == "use"
        && r.credential_name == "nope"
        && r.outcome == "failed"));
    assert!(has("credential", &|r| r.credential_action == "use"
        && r.outcome == "denied"
        && r.portion_digest == digest));
    assert!(has("security", &|r| r.security_kind == "foreign_access"
        && r.parent == "(another parent)"));
    let text = format!("{a_audit:?}");
    assert!(!text.contains("data-never-logged") && !text.contains("parent-b"));
    let b_audit = b
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(b_audit.len(), 4, "{b_audit:?}");
    for r in &b_audit {
        assert_eq!((r.r#type.as_str(), r.owner.as_str()), ("security", ""));
        assert_eq!(r.parent, "cert:parent-b");
    }
    // Filters.
    let only = a
        .list_audit(pb::ListAuditRequest {
            bubble_id: spin.bubble_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(!only.is_empty() && only.iter().all(|r| r.bubble_id == spin.bubble_id));
    // Pages of two, followed by their tokens, give the same records in
    // the same order (records made since may follow); a token that is
    // not one is INVALID_ARGUMENT.
    let full: Vec<u64> = a
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records
        .iter()
        .map(|r| r.seq)
        .collect();
    assert!(full.len() > 4, "{full:?}");
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let p = a
            .list_audit(pb::ListAuditRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(p.records.len() <= 2, "{p:?}");
        paged.extend(p.records.iter().map(|r| r.seq));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(paged[..full.len()], full[..], "{paged:?}");
    let e = a
        .list_audit(pb::ListAuditRequest {
            page_token: "x1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Offline: the chain verifies under the broker's usage key (a clean
    // stop writes a last checkpoint), and a one-byte edit of a record in
    // the middle fails verify naming that record.
    let key: String = a
        .get_usage(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .broker_public_key
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    // Streams still open would hold the graceful stop.
    drop((a_events, b_events, a, b));
    broker.terminate();
    let log = dir.path().join("audit").join("audit.log");
    let out = ctl(
        dir.path(),
        &[
            "--json",
            "audit",
            "verify",
            log.to_str().unwrap(),
            "--key",
            &key,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The stop signed everything.
    assert_eq!(v["summary"]["unsigned_tail"], 0, "{v}");
    assert!(v["summary"]["checkpoints"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["summary"]["key_checked"], true, "{v}");
    assert!(out.stderr.is_empty(), "{out:?}");
    // Without --key it still verifies, but says whose key it trusted.
    let out = ctl(
        dir.path(),
        &["--json", "audit", "verify", log.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["key_checked"], false, "{v}");
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        warn.contains("no --key given") && warn.contains(&key),
        "{warn}"
    );
    let bytes = std::fs::read(&log).unwrap();
    let (recs, _) = bubble_audit::records(&bytes).unwrap();
    let victim = recs.len() / 2;
    let mut edited = bytes.clone();
    // A byte inside the record's body, past its length and header.
    edited[recs[victim].0 as usize + 60] ^= 0x20;
    let bad = dir.path().join("edited.log");
    std::fs::write(&bad, &edited).unwrap();
    let out = ctl(
        dir.path(),
        &["--json", "audit", "verify", bad.to_str().unwrap()],
    );
    assert!(!out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["record"], victim as u64, "{v}");
}

/// A parent that keeps naming bubbles it does not own is throttled: every
/// request it makes is refused RESOURCE_EXHAUSTED with the time to wait,
/// and a `probing` event is in its audit records; other parents go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probing_parent_is_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), true);
    let mut m = broker.tls_client("parent-b").await;
    let mut a = broker.tls_client("parent-a").await;
    let own = a.create_bubble(create_req(8)).await.unwrap().into_inner();
    for i in 0..10u32 {
        let id = format!("b-{:032x}", 0xdead_0000u64 + u64::from(i));
        let e = m
            .describe_bubble(pb::BubbleRef { bubble_id: id })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{i}: {e:?}");
    }
    let e = m
        .list_bubbles(pb::ListBubblesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let wait: u64 = e
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(wait > 0 && wait <= 60_000, "{wait}");
    // The other parent is not affected.
    let d = a
        .describe_bubble(pb::BubbleRef {
            bubble_id: own.bubble_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.bubble_id, own.bubble_id);
    // The event is on record (read from the broker's log, which the
    // writer reaches within moments, as the throttled parent cannot ask).
    let log = dir.path().join("audit").join("audit.log");
    let probing = |log: &std::path::Path| {
        let bytes = std::fs::read(log).unwrap();
        let (recs, _) = bubble_audit::records(&bytes).unwrap();
        recs.iter().any(|(_, r, _)| {
            matches!(&r.what, bubble_audit::What::Security { kind } if kind == "probing")
                && r.entry.parent == "cert:parent-b"
        })
    };
    wait_until(
        "the probing record",
        Duration::from_secs(5),
        || probing(&log),
        |p| *p,
    )
    .await;
}
