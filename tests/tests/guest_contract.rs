//! End to end on real KVM: the guest contract's one op-name limit. SIGN and
//! SEAL are flags of the CALL, so a signed call with an op of MAX_OP_LEN
//! characters reaches the guest unchanged (ABI v1 prefixed it with `sign:`
//! and the VMM failed the bubble for breaking the ABI); one character more
//! is refused by the broker with INVALID_ARGUMENT. The bubble stays READY.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
/// The guest contract's limit (`bubble_abi::MAX_OP_LEN`).
const MAX_OP_LEN: usize = bubble_vmm::abi::MAX_OP_LEN;

async fn state(c: &mut Client, id: &str) -> pb::Bubble {
    c.describe_bubble(pb::BubbleRef {
        bubble_id: id.to_string(),
    })
    .await
    .expect("describe")
    .into_inner()
}

fn signed(id: &str, op: &str, input: &[u8], seal_to: Option<[u8; 32]>) -> pb::CallRequest {
    pb::CallRequest {
        sign: true,
        seal_to: seal_to.map(|k| k.to_vec()).unwrap_or_default(),
        ..call_req(id, op, input)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_calls_with_the_longest_op_keep_the_bubble_ready() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    let id = b.bubble_id.clone();

    // A signed call still works and verifies with the bubble's key.
    let keys = c
        .call(call_req(&id, "keys", b""))
        .await
        .unwrap()
        .into_inner()
        .output;
    let sig_pk: [u8; 32] = keys[32..64].try_into().unwrap();
    let r = c
        .call(signed(&id, "echo", b"hello", None))
        .await
        .unwrap()
        .into_inner();
    let plain = bubble_keys::verify_and_open_result(
        &sig_pk,
        &id,
        r.call_id,
        b"hello",
        &r.output,
        &r.signature,
        None,
    )
    .unwrap();
    assert_eq!(plain.expose(), b"hello");

    // 64 characters, signed, and signed + sealed: the guest does not know
    // the op and says so cleanly; the bubble stays READY.
    let op64 = "x".repeat(MAX_OP_LEN);
    for seal in [None, Some([9u8; 32])] {
        let e = c.call(signed(&id, &op64, b"in", seal)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("unknown op"), "{e:?}");
        let d = state(&mut c, &id).await;
        assert_eq!(d.state, READY, "{}", d.failure_reason);
    }
    // An unsigned 64-character op likewise.
    let e = c.call(call_req(&id, &op64, b"")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // 65 characters: refused by the broker, signed or not, before any
    // guest sees it.
    let op65 = "x".repeat(MAX_OP_LEN + 1);
    for req in [
        signed(&id, &op65, b"", None),
        signed(&id, &op65, b"", Some([9u8; 32])),
        call_req(&id, &op65, b""),
    ] {
        let e = c.call(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("op"), "{e:?}");
    }
    let d = state(&mut c, &id).await;
    assert_eq!(d.state, READY, "{}", d.failure_reason);
    // `keys`, the signed echo and the three calls the guest refused; the
    // broker's refusals never reached it.
    assert_eq!(d.calls, 5, "{d:?}");

    // And it still answers.
    let r = c.call(call_req(&id, "echo", b"after")).await.unwrap();
    assert_eq!(r.into_inner().output, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_ops_are_refused_on_call() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id;
    // A parent cannot change the attested policy, load a portion the
    // broker's list does not show, or provision around its checks.
    for op in [
        "set_policy",
        "load_portion",
        "provision",
        "portion",
        "portion_sealed",
        "portion_session",
        "resume",
    ] {
        for sign in [false, true] {
            let req = pb::CallRequest {
                sign,
                ..call_req(&id, op, b"\x01\x02")
            };
            let st = c.call(req).await.unwrap_err();
            assert_eq!(st.code(), Code::InvalidArgument, "{op}: {st:?}");
            assert!(st.message().contains("internal"), "{op}: {st:?}");
        }
    }
    let s = state(&mut c, &id).await;
    assert_eq!(s.state, READY, "{}", s.failure_reason);
    assert_eq!(s.calls, 0, "nothing reached the guest");
    // Public ops still work, and attest stays callable (read-only).
    let out = c.call(call_req(&id, "echo", b"ok")).await.unwrap();
    assert_eq!(out.into_inner().output, b"ok");
    c.call(call_req(&id, "attest", &[7u8; 32])).await.unwrap();
}
