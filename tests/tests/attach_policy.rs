//! End to end on real KVM: AttachBubble with a security policy. The policy
//! is installed in the pooled bubble before it is handed over (its
//! attestation binds it, and the payments flow runs on a warm bubble); a
//! bubble is never handed to another parent carrying someone's policy; a
//! refused attach leaves the pooled bubble untouched; a retried request id
//! with another policy is ALREADY_EXISTS naming it.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_client::Parent;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};
use tonic::Code;

const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");

fn grants() -> Vec<(String, Vec<String>)> {
    vec![(
        "payments".into(),
        vec!["tokenization_key".into(), "gateway_key".into()],
    )]
}

fn policy() -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: None,
        grants: grants()
            .into_iter()
            .map(|(portion, credentials)| pb::CredentialGrant {
                portion,
                credentials,
            })
            .collect(),
        ..Default::default()
    }
}

fn digest_of(grants: Vec<(String, Vec<String>)>) -> Vec<u8> {
    bubble_attestation::SecurityPolicy {
        credential_rate: None,
        grants,
        ..Default::default()
    }
    .digest()
    .to_vec()
}

fn attach(policy: Option<pb::SecurityPolicy>, request_id: &str) -> pb::AttachBubbleRequest {
    pb::AttachBubbleRequest {
        profile: "warm".into(),
        policy,
        client_request_id: request_id.into(),
        ..Default::default()
    }
}

fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_pool(broker: &BrokerProc, depth: f64) {
    wait_until(
        "the warm pool to fill",
        Duration::from_secs(30),
        || {
            metric(
                &broker.admin_get("/metrics"),
                "bubbled_pool_depth{profile=\"warm\"} ",
            )
            .unwrap_or(-1.0)
        },
        |d| *d >= depth,
    )
    .await;
}

async fn policy_digest(c: &mut Client, id: &str) -> Vec<u8> {
    c.get_attestation(pb::GetAttestationRequest {
        bubble_id: id.into(),
        nonce: vec![7; 32],
    })
    .await
    .unwrap()
    .into_inner()
    .policy_digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_with_a_policy_runs_the_payments_flow_on_a_warm_bubble() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            config: Some(
                "[quota]\nmax_bubbles_per_parent = 1\n\
                 [[pool]]\nname = \"warm\"\nmemory_mib = 16\nsize = 2\n"
                    .into(),
            ),
            ..Opts::default()
        },
    );
    wait_pool(&broker, 2.0).await;
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;

    // From the pool (no miss), with the policy bound into its report.
    let got = a
        .attach_bubble(attach(Some(policy()), "pay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::BubbleState::Ready as i32, "{got:?}");
    assert_eq!(got.profile, "warm");
    let m = broker.admin_get("/metrics");
    assert_eq!(metric(&m, "bubbled_pool_misses_total "), Some(0.0), "{m}");
    let id = got.bubble_id.clone();

    // The payments flow: load, attest (freezes the code), provision,
    // tokenize — the grant that lets the portion use the key is the
    // attached policy's (the default policy grants nothing).
    let module = wat::parse_str(PAYMENTS).unwrap();
    a.load_portion(pb::LoadPortionRequest {
        bubble_id: id.clone(),
        name: "payments".into(),
        module,
    })
    .await
    .unwrap();
    assert_eq!(policy_digest(&mut a, &id).await, digest_of(grants()));
    assert_ne!(digest_of(grants()), digest_of(Vec::new()));
    let parent = Parent::from_client(a.clone());
    let mut bubble = parent.bubble(&id);
    let (_, code) = bubble.trust_unverified().await.unwrap();
    assert_eq!(code.policy_digest.to_vec(), digest_of(grants()));
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(5)).collect();
    bubble.provision("tokenization_key", &key).await.unwrap();
    let pan = b"4111111111111111";
    let token = bubble
        .call_verified_portion("payments", "tokenize", pan)
        .await
        .unwrap();
    let mut h = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    h.update(pan);
    assert_eq!(token, h.finalize().into_bytes().to_vec());

    // The same request id with another policy: ALREADY_EXISTS naming it;
    // with the same policy: the same bubble.
    let e = a.attach_bubble(attach(None, "pay-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("policy"), "{e:?}");
    let again = a
        .attach_bubble(attach(Some(policy()), "pay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.bubble_id, id);

    // Over quota: refused before any pooled bubble is touched...
    wait_pool(&broker, 2.0).await;
    let e = a
        .attach_bubble(attach(Some(policy()), "pay-2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // ...so both pooled bubbles still carry the default policy when other
    // parents attach them, and none carries parent-a's.
    let m = broker.admin_get("/metrics");
    assert_eq!(
        metric(&m, "bubbled_pool_depth{profile=\"warm\"} "),
        Some(2.0),
        "{m}"
    );
    let x = b
        .attach_bubble(attach(None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(x.owner, "cert:parent-b");
    assert_eq!(
        policy_digest(&mut b, &x.bubble_id).await,
        digest_of(Vec::new())
    );
    let failed = m
        .lines()
        .filter(|l| l.starts_with("bubbled_failures_total") && !l.ends_with(" 0"))
        .collect::<Vec<_>>();
    assert!(failed.is_empty(), "no bubble was failed: {failed:?}");
}

/// Bubbles failed so far, every reason summed.
fn failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("bubbled_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A hostile or broken attach cannot drain the pool: a policy the guest
/// would refuse fails fast with INVALID_ARGUMENT and touches no pooled
/// bubble; and when pooled bubbles cannot take a policy (here injected:
/// every `set_policy` fails), the attach gives up after two of them with
/// UNAVAILABLE, leaving the rest of the pool to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_with_a_policy_burns_at_most_two_pool_entries() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            admin: true,
            config: Some("[[pool]]\nname = \"warm\"\nmemory_mib = 16\nsize = 4\n".into()),
            env: vec![("BUBBLED_TEST_FAIL".into(), "attach.set_policy".into())],
            ..Opts::default()
        },
    );
    wait_pool(&broker, 4.0).await;
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;

    for bad in [
        pb::SecurityPolicy {
            credential_rate: None,
            grants: vec![pb::CredentialGrant {
                portion: "no spaces allowed".into(),
                credentials: vec![],
            }],
            ..Default::default()
        },
        pb::SecurityPolicy {
            credential_rate: None,
            memory_limit_bytes: 1 << 30,
            ..policy()
        },
    ] {
        let e = a
            .attach_bubble(attach(Some(bad.clone()), ""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    let m = broker.admin_get("/metrics");
    assert_eq!(
        metric(&m, "bubbled_pool_depth{profile=\"warm\"} "),
        Some(4.0),
        "{m}"
    );
    assert_eq!(failures(&m), 0.0, "{m}");

    let e = a
        .attach_bubble(attach(Some(policy()), ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("2 attempts"), "{e:?}");
    let m = broker.admin_get("/metrics");
    assert_eq!(failures(&m), 2.0, "exactly two pooled bubbles failed: {m}");
    // The other pooled bubbles are still there for attaches without one.
    let x = b
        .attach_bubble(attach(None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(x.owner, "cert:parent-b");
    assert_eq!(
        metric(&broker.admin_get("/metrics"), "bubbled_pool_misses_total "),
        Some(0.0)
    );
}
