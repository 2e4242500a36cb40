//! Per-trigger security policy, end to end on real KVM: a trigger on a
//! named bubble runs under that bubble's policy and refuses another one;
//! a credential the policy grants is used (the HMAC checks out), one it
//! does not grant is refused inside the bubble (outcome "refused", no
//! retries); a pool trigger's bubbles are attached with its policy (their
//! attestation binds that policy's digest).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_client::Parent;
use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};
use tonic::Code;

const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");
const LIMIT: Duration = Duration::from_secs(30);
const PAN: &[u8] = b"4111111111111111";

fn grants(portion: &str, credential: &str) -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        grants: vec![pb::CredentialGrant {
            portion: portion.into(),
            credentials: vec![credential.into()],
        }],
        ..Default::default()
    }
}

fn digest_of(p: &pb::SecurityPolicy) -> Vec<u8> {
    bubble_attestation::SecurityPolicy {
        fuel_per_call: if p.fuel_per_call == 0 {
            bubble_attestation::SecurityPolicy::default().fuel_per_call
        } else {
            p.fuel_per_call
        },
        grants: p
            .grants
            .iter()
            .map(|g| (g.portion.clone(), g.credentials.clone()))
            .collect(),
        ..Default::default()
    }
    .digest()
    .to_vec()
}

/// A bubble with `policy`, the payments portion loaded and `key`
/// provisioned as its tokenization key (sealed to the bubble).
async fn payments_bubble(c: &mut Client, policy: pb::SecurityPolicy, key: &[u8]) -> String {
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(policy),
            ..create_req(16)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, pb::BubbleState::Ready as i32, "{b:?}");
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "payments".into(),
        module: wat::parse_str(PAYMENTS).unwrap(),
    })
    .await
    .unwrap();
    let parent = Parent::from_client(c.clone());
    let mut h = parent.bubble(&b.bubble_id);
    h.trust_unverified().await.unwrap();
    h.provision("tokenization_key", key).await.unwrap();
    b.bubble_id
}

fn tokenize_on(
    subject: &str,
    bubble: &str,
    policy: Option<pb::SecurityPolicy>,
) -> pb::CreateTriggerRequest {
    pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "payments".into(),
        function: "tokenize".into(),
        max_deliver: 3,
        policy,
        ..Default::default()
    }
}

async fn one_result(c: &mut Client, trigger: &str, key: &str) -> pb::EventResult {
    results(c, trigger, &[key.to_string()], LIMIT)
        .await
        .pop()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggers_policy_decides_which_credentials_its_events_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(
                "[events]\nretry_delay_ms = 20\n\
                 [[pool]]\nname = \"ev\"\nmemory_mib = 16\nsize = 1\n"
                    .into(),
            ),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    let granting = grants("payments", "tokenization_key");

    // A named bubble whose policy grants the key: a trigger may name that
    // policy (or none), never another one.
    let good = payments_bubble(&mut c, granting.clone(), &key).await;
    for other in [
        pb::SecurityPolicy::default(),
        grants("payments", "gateway_key"),
        pb::SecurityPolicy {
            fuel_per_call: 1000,
            ..granting.clone()
        },
    ] {
        let e = c
            .create_trigger(tokenize_on("pay.x", &good, Some(other)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("policy"), "{e:?}");
    }
    assert!(c
        .list_triggers(pb::ListTriggersRequest {})
        .await
        .unwrap()
        .into_inner()
        .triggers
        .is_empty());
    let t = c
        .create_trigger(tokenize_on("pay.good", &good, Some(granting.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.policy_digest, digest_of(&granting));
    assert!(publish(&mut c, "pay.good", "o-1", PAN).await);
    let r = one_result(&mut c, &t.trigger_id, "o-1").await;
    assert_eq!(r.outcome, "ok", "{r:?}");
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(PAN);
    assert_eq!(r.output, mac.finalize().into_bytes().to_vec());

    // The same portion and key under a policy that does not grant it: the
    // use is refused inside the bubble, once (no retries, no dead letter).
    let bare = payments_bubble(&mut c, pb::SecurityPolicy::default(), &key).await;
    let t2 = c
        .create_trigger(tokenize_on(
            "pay.bare",
            &bare,
            Some(pb::SecurityPolicy::default()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t2.policy_digest, vec![0u8; 32]);
    let before = describe(&mut c, &bare).await.calls;
    assert!(publish(&mut c, "pay.bare", "o-2", PAN).await);
    let r = one_result(&mut c, &t2.trigger_id, "o-2").await;
    assert_eq!(r.outcome, "refused", "{r:?}");
    assert!(r.reason.contains("not granted"), "{r:?}");
    assert!(r.output.is_empty() && r.signature.is_empty(), "{r:?}");
    assert_eq!(
        describe(&mut c, &bare).await.calls,
        before + 1,
        "the refused event ran once"
    );

    // A pool trigger: its bubbles are attached with its policy, and the
    // attested digest says so.
    let pool_policy = pb::SecurityPolicy {
        fuel_per_call: 2_000_000,
        ..grants("ev", "k")
    };
    let t3 = c
        .create_trigger(pb::CreateTriggerRequest {
            subject: "pool".into(),
            profile: "ev".into(),
            module: events_module(),
            portion: "ev".into(),
            function: "echo".into(),
            policy: Some(pool_policy.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t3.policy_digest, digest_of(&pool_policy));
    assert!(publish(&mut c, "pool", "p-1", b"hello").await);
    let r = one_result(&mut c, &t3.trigger_id, "p-1").await;
    assert_eq!(
        (r.outcome.as_str(), r.output.as_slice()),
        ("ok", &b"hello"[..])
    );
    let att = c
        .get_attestation(pb::GetAttestationRequest {
            bubble_id: r.bubble_id.clone(),
            nonce: vec![3; 32],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(att.policy_digest, digest_of(&pool_policy));

    // A pool trigger without a policy: the default one, which grants
    // nothing, so the payments portion's use of the key is refused.
    let t4 = c
        .create_trigger(pb::CreateTriggerRequest {
            subject: "pool.bare".into(),
            profile: "ev".into(),
            module: wat::parse_str(PAYMENTS).unwrap(),
            portion: "payments".into(),
            function: "tokenize".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t4.policy_digest, vec![0u8; 32]);
    assert!(publish(&mut c, "pool.bare", "p-2", PAN).await);
    let r = one_result(&mut c, &t4.trigger_id, "p-2").await;
    assert_eq!(r.outcome, "refused", "{r:?}");
    assert!(r.reason.contains("not granted"), "{r:?}");
}
