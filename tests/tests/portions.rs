//! End to end on real KVM: WebAssembly code portions using credentials
//! they cannot read, under a security policy, through the broker.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::Parent;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha384};
use tonic::Code;

const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");
const HOSTILE: &str = include_str!("../../examples/payments/hostile.wat");

fn policy() -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: None,
        fuel_per_call: 2_000_000,
        memory_limit_bytes: 1 << 20,
        call_deadline_ms: 2000,
        max_output_bytes: 16 << 10,
        grants: vec![
            pb::CredentialGrant {
                portion: "payments".into(),
                credentials: vec!["tokenization_key".into(), "gateway_key".into()],
            },
            pb::CredentialGrant {
                portion: "hostile".into(),
                credentials: vec![],
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_portion_tokenizes_and_signs_within_policy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(policy()),
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
    let parent = Parent::from_client(c.clone());
    let mut bubble = parent.bubble(&b.bubble_id);

    // Load the portions; the digest chain is recomputable by the parent.
    let mut expect = [0u8; 48];
    for (name, wat_src) in [("payments", PAYMENTS), ("hostile", HOSTILE)] {
        let module = wat::parse_str(wat_src).unwrap();
        let r = c
            .load_portion(pb::LoadPortionRequest {
                bubble_id: b.bubble_id.clone(),
                name: name.into(),
                module: module.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut h = Sha384::new();
        h.update(expect);
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(Sha384::digest(&module));
        expect = h.finalize().into();
        assert_eq!(r.portions_digest, expect.to_vec());
    }
    // Then the keys and code digests (the attest binding freezes the code),
    // then the credentials, sealed to that code.
    let (_, code) = bubble.trust_unverified().await.unwrap();
    assert_eq!(code.portions_digest, expect);
    let tok_key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    let gw_seed = [42u8; 32];
    bubble
        .provision("tokenization_key", &tok_key)
        .await
        .unwrap();
    bubble.provision("gateway_key", &gw_seed).await.unwrap();
    // The attestation binding reflects the loaded portions.
    let a = c
        .call(call_req(&b.bubble_id, "attest", &[9u8; 32]))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(&a[128..176], &expect[..]);

    // Tokenize: equals the host-side HMAC under the provisioned key.
    let pan = b"4111111111111111";
    let token = c
        .call(portion_call(&b.bubble_id, "payments", "tokenize", pan))
        .await
        .unwrap()
        .into_inner()
        .output;
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&tok_key).unwrap();
    m.update(pan);
    assert_eq!(token, m.finalize().into_bytes().to_vec());
    // Signed by the bubble too, through the client library.
    let verified = bubble
        .call_verified_portion("payments", "tokenize", pan)
        .await
        .unwrap();
    assert_eq!(verified, token);

    // Charges within the limit are signed with the gateway key.
    let mut charge = 5_000u64.to_le_bytes().to_vec();
    charge.extend(b"merchant=shop-1;currency=EUR;order=42");
    let sig = c
        .call(portion_call(
            &b.bubble_id,
            "payments",
            "sign_charge",
            &charge,
        ))
        .await
        .unwrap()
        .into_inner()
        .output;
    let vk = ed25519_dalek::SigningKey::from_bytes(&gw_seed).verifying_key();
    vk.verify_strict(
        &charge,
        &ed25519_dalek::Signature::from_slice(&sig).unwrap(),
    )
    .unwrap();
    // Over the limit: refused by the portion.
    let mut big = 200_000u64.to_le_bytes().to_vec();
    big.extend(b"merchant=shop-1");
    let e = c
        .call(portion_call(&b.bubble_id, "payments", "sign_charge", &big))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Credentials granted to a portion are not usable by built-in ops.
    let mut h = vec![16u8];
    h.extend(b"tokenization_key");
    h.extend(pan);
    let e = c
        .call(call_req(&b.bubble_id, "hmac", &h))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Hostile portions fail precisely; the bubble keeps working.
    let secret_hex: String = tok_key.iter().map(|x| format!("{x:02x}")).collect();
    for (f, code) in [
        ("spin", Code::ResourceExhausted),
        ("grow", Code::ResourceExhausted),
        ("steal", Code::PermissionDenied),
        ("flood", Code::ResourceExhausted),
        ("oob", Code::Aborted),
    ] {
        let e = c
            .call(portion_call(&b.bubble_id, "hostile", f, b""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{f}: {e:?}");
        let msg = e.message().as_bytes();
        assert!(!msg.windows(tok_key.len()).any(|w| w == &tok_key[..]));
        assert!(!e.message().contains(&secret_hex));
        assert!(!msg.windows(32).any(|w| w == gw_seed));
        let again = c
            .call(portion_call(&b.bubble_id, "payments", "tokenize", pan))
            .await
            .unwrap()
            .into_inner()
            .output;
        assert_eq!(again, token, "bubble unusable after {f}");
    }
    // Unknown portion or function, bad policy fields.
    let e = c
        .call(portion_call(&b.bubble_id, "nope", "tokenize", pan))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                credential_rate: None,
                memory_limit_bytes: 1 << 30,
                ..policy()
            }),
            ..create_req(16)
        })
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("policy.memory_limit_bytes"),
        "{}",
        e.message()
    );
    let info = c
        .describe_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, pb::BubbleState::Ready as i32);
}
