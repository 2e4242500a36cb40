//! The payments example as the grants and sessions tests use it: a bubble
//! whose policy grants the payments portion its keys, the portions loaded,
//! the code frozen by the attest binding and a tokenization key sealed to
//! that code.

// The test harness: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::{Bubble, Parent};
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};

use crate::create_req;

/// The payments portion.
pub const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");
/// A hostile portion (tries what the policy forbids).
pub const HOSTILE: &str = include_str!("../../examples/payments/hostile.wat");

/// The policy's grants: the payments portion gets its two keys.
pub fn grants() -> Vec<(String, Vec<String>)> {
    vec![(
        "payments".into(),
        vec!["tokenization_key".into(), "gateway_key".into()],
    )]
}

/// A bubble whose policy grants the payments portion its two keys.
pub async fn payments_bubble(parent: &Parent) -> Bubble {
    let b = parent
        .grpc()
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                grants: grants()
                    .into_iter()
                    .map(|(portion, credentials)| pb::CredentialGrant {
                        portion,
                        credentials,
                    })
                    .collect(),
                ..Default::default()
            }),
            ..create_req(16)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.state,
        pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
    parent.bubble(&b.bubble_id)
}

/// The digest of the payments policy.
pub fn policy_digest() -> [u8; 32] {
    bubble_attestation::SecurityPolicy {
        credential_rate: None,
        grants: grants(),
        ..Default::default()
    }
    .digest()
}

/// A WebAssembly module from its text.
pub fn module(wat_src: &str) -> Vec<u8> {
    wat::parse_str(wat_src).unwrap()
}

/// What `tokenize` answers for `pan` under `key`.
pub fn tokenize(key: &[u8], pan: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(pan);
    m.finalize().into_bytes().to_vec()
}

/// A bubble with the payments and hostile portions, its code frozen by
/// the attest binding, and a tokenization key sealed to that code.
pub async fn tokenizer(parent: &Parent, key: &[u8]) -> Bubble {
    let mut b = payments_bubble(parent).await;
    b.load_portion("payments", &module(PAYMENTS)).await.unwrap();
    b.load_portion("hostile", &module(HOSTILE)).await.unwrap();
    b.trust_unverified().await.unwrap();
    b.provision("tokenization_key", key).await.unwrap();
    b
}

/// A bubble whose policy names the hostile portion and grants it no
/// credential (the quarantine and strike tests).
pub async fn hostile_bubble(c: &mut crate::Client) -> String {
    let policy = pb::SecurityPolicy {
        credential_rate: None,
        grants: vec![pb::CredentialGrant {
            portion: "hostile".into(),
            credentials: vec![],
        }],
        ..Default::default()
    };
    c.create_bubble(pb::CreateBubbleRequest {
        policy: Some(policy),
        ..create_req(16)
    })
    .await
    .unwrap()
    .into_inner()
    .bubble_id
}

/// Loads the hostile portion as "hostile" into bubble `id`.
pub async fn load_hostile(c: &mut crate::Client, id: &str) -> Result<(), tonic::Status> {
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: id.to_string(),
        name: "hostile".into(),
        module: wat::parse_str(HOSTILE).unwrap(),
    })
    .await
    .map(|_| ())
}
