//! End to end on real KVM, written as the attacks of issue 17: a parent
//! that swaps the code under a grant, re-provisions a granted name, or
//! replays, redirects or forges sealed inputs; and a broker that must never
//! see a card number a parent sealed to the bubble.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::{Bubble, CodeBinding, Parent};
use bubble_e2e_tests::payments::*;
use bubble_e2e_tests::spy::{contains, files_under, recording_proxy};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

fn code_of(status: Result<impl Sized, bubble_client::ClientError>) -> Code {
    match status {
        Err(bubble_client::ClientError::Status { code, .. }) => code,
        Err(e) => panic!("not a status: {e}"),
        Ok(_) => Code::Ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_under_grants_cannot_be_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let parent = Parent::from_client(broker.client().await);
    let payments = module(PAYMENTS);
    let hostile = module(HOSTILE);

    // Attested (the binding) → no load, no replacement.
    let mut a = payments_bubble(&parent).await;
    a.load_portion("payments", &payments).await.unwrap();
    a.trust_unverified().await.unwrap();
    for (name, m) in [("other", &payments), ("payments", &hostile)] {
        let e = a.load_portion(name, m).await;
        assert_eq!(code_of(e), Code::FailedPrecondition, "load {name}");
    }

    // A credential sealed for one code set opens for no other: the
    // custodian sealed for "payments", the parent swapped the module under
    // the same name before provisioning.
    let b = payments_bubble(&parent).await;
    let keys = b.fetch_keys_unverified().await.unwrap();
    let digest_a = load(&b, "payments", &payments).await;
    let digest_b = load(&b, "payments", &hostile).await;
    let mut custodian = custodian_of(&parent, b.id(), keys, digest_b);
    for code in [
        // The code the custodian verified, no longer the bubble's.
        CodeBinding {
            portions_digest: digest_a,
            policy_digest: policy_digest(),
        },
        // The bubble's code under another policy.
        CodeBinding {
            portions_digest: digest_b,
            policy_digest: [0; 32],
        },
    ] {
        custodian.trust_code(code);
        let e = custodian.provision("tokenization_key", &[1; 32]).await;
        assert_eq!(code_of(e), Code::InvalidArgument);
    }
    // Sealed for the code the bubble really runs, it opens, and from then
    // on that code stays: no load, no replacement, no re-provisioning.
    custodian.trust_code(CodeBinding {
        portions_digest: digest_b,
        policy_digest: policy_digest(),
    });
    custodian
        .provision("tokenization_key", &[1; 32])
        .await
        .unwrap();
    for (name, m) in [("payments", &payments), ("more", &payments)] {
        let e = b.load_portion(name, m).await;
        assert_eq!(code_of(e), Code::FailedPrecondition, "load {name}");
    }
    let e = custodian
        .provision("tokenization_key", b"a key the parent chose")
        .await;
    assert_eq!(code_of(e), Code::FailedPrecondition);

    // Racing a load against a provisioning: whichever the bubble runs
    // first, a credential never sits under code it was not sealed for.
    for round in 0..4 {
        let c = payments_bubble(&parent).await;
        let d = load(&c, "payments", &payments).await;
        let cust = custodian_of(&parent, c.id(), c.fetch_keys_unverified().await.unwrap(), d);
        let (loaded, prov) = tokio::join!(
            c.load_portion("payments", &hostile),
            cust.provision("tokenization_key", &[2; 32])
        );
        match (code_of(loaded), code_of(prov)) {
            (Code::FailedPrecondition, Code::Ok) | (Code::Ok, Code::InvalidArgument) => {}
            other => panic!("round {round}: load and provision gave {other:?}"),
        }
        c.delete().await.unwrap();
    }
    for x in [a, b] {
        assert_eq!(
            describe_state(&parent, x.id()).await,
            pb::BubbleState::Ready
        );
        x.delete().await.unwrap();
    }
}

/// Loads a portion; returns the new portions digest.
async fn load(b: &Bubble, name: &str, module: &[u8]) -> [u8; 48] {
    let d = b.load_portion(name, module).await.unwrap();
    d.try_into().unwrap()
}

/// A key custodian's handle on a bubble: its keys, and the code (these
/// portions under the payments policy) it seals credentials to.
fn custodian_of(
    parent: &Parent,
    id: &str,
    keys: bubble_client::BubbleKeys,
    portions_digest: [u8; 48],
) -> Bubble {
    let mut c = parent.bubble(id);
    c.trust_keys(keys);
    c.trust_code(CodeBinding {
        portions_digest,
        policy_digest: policy_digest(),
    });
    c
}

async fn describe_state(parent: &Parent, id: &str) -> pb::BubbleState {
    let mut c = parent.grpc();
    let b = describe(&mut c, id).await;
    pb::BubbleState::try_from(b.state).unwrap()
}

fn sealed_req(b: &Bubble, function: &str, sealed: pb::SealedInput) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: b.id().to_string(),
        op: function.into(),
        portion: "payments".into(),
        sealed_input: Some(sealed),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_inputs_are_bound_and_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    let key = [0x42u8; 32];
    let a = tokenizer(&parent, &key).await;
    let other = tokenizer(&parent, &[0x43; 32]).await;
    let pan = b"4111111111111111";

    // The client library seals by default.
    let t = a.portion("payments").call("tokenize", pan).await.unwrap();
    assert_eq!(t, tokenize(&key, pan));

    // One sealed request sent eight times at once: exactly one runs.
    let req = sealed_req(
        &a,
        "tokenize",
        a.seal_input("payments", "tokenize", a.next_seq(), pan)
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut c, req) = (c.clone(), req.clone());
        tasks.push(tokio::spawn(async move { c.call(req).await }));
    }
    let (mut ok, mut replayed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().output, tokenize(&key, pan));
                ok += 1;
            }
            Err(s) if s.code() == Code::AlreadyExists => replayed += 1,
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!((ok, replayed), (1, 7));

    // Redirected: to another bubble (sealed to the other one's key, or to
    // this one's key with the other's id), to another function, with
    // another sequence number. None opens, and none spends its number.
    let seq = a.next_seq();
    let to_other = other.seal_input("payments", "tokenize", seq, pan).unwrap();
    let mut spoof = parent.bubble(other.id());
    spoof.trust_keys(a.keys().unwrap());
    let as_other = spoof.seal_input("payments", "tokenize", seq, pan).unwrap();
    let for_sign = a.seal_input("payments", "sign_charge", seq, pan).unwrap();
    let mut shifted = a.seal_input("payments", "tokenize", seq, pan).unwrap();
    shifted.seq += 1;
    for (what, r) in [
        ("other bubble's key", sealed_req(&a, "tokenize", to_other)),
        ("other bubble's id", sealed_req(&a, "tokenize", as_other)),
        ("other function", sealed_req(&a, "tokenize", for_sign)),
        ("other seq", sealed_req(&a, "tokenize", shifted)),
    ] {
        let e = c.call(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("does not open"), "{what}: {e:?}");
    }
    // Sealed for the "payments" portion, sent to another loaded one.
    let mut wrong_portion = sealed_req(
        &a,
        "tokenize",
        a.seal_input("payments", "tokenize", a.next_seq(), pan)
            .unwrap(),
    );
    wrong_portion.portion = "hostile".into();
    let e = c.call(wrong_portion).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("does not open"), "{e:?}");
    // A plaintext input beside a sealed one, or a sealed built-in op: refused
    // by the broker.
    let mut both = req.clone();
    both.input = pan.to_vec();
    assert_eq!(
        c.call(both).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut builtin = req.clone();
    builtin.portion.clear();
    builtin.op = "echo".into();
    assert_eq!(
        c.call(builtin).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // The refusals spent nothing: the number still works, once.
    let good = sealed_req(
        &a,
        "tokenize",
        a.seal_input("payments", "tokenize", seq, pan).unwrap(),
    );
    assert_eq!(
        c.call(good.clone()).await.unwrap().into_inner().output,
        tokenize(&key, pan)
    );

    // The replay window survives suspend and restore.
    suspend_and_restore(&mut c, a.id()).await;
    assert_eq!(c.call(good).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(c.call(req).await.unwrap_err().code(), Code::AlreadyExists);
    let t = a.portion("payments").call("tokenize", pan).await.unwrap();
    assert_eq!(t, tokenize(&key, pan));
    // And the code stays frozen after a restore.
    let e = a.load_portion("payments", &module(HOSTILE)).await;
    assert_eq!(code_of(e), Code::FailedPrecondition);
    for x in [a, other] {
        assert_eq!(
            describe_state(&parent, x.id()).await,
            pb::BubbleState::Ready
        );
        x.delete().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_never_sees_a_sealed_card_number() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            env: vec![("RUST_LOG".into(), "debug".into())],
            ..Opts::default()
        },
    );
    let proxy_sock = dir.path().join("proxy.sock");
    let traffic = recording_proxy(broker.socket.clone(), proxy_sock.clone()).await;
    let parent = Parent::connect_unix(&proxy_sock).await.unwrap();
    let key = [0x5au8; 32];
    let b = tokenizer(&parent, &key).await;
    let pan = b"4929384756102938";
    let payments = b.portion("payments");
    for _ in 0..3 {
        assert_eq!(
            payments.call("tokenize", pan).await.unwrap(),
            tokenize(&key, pan)
        );
    }
    // The control: a card sent in plaintext is seen, so the spy works.
    let control = b"5500005555555559";
    payments
        .call_plain_input("tokenize", control)
        .await
        .unwrap();
    // A session whose key the test knows, sent through the proxy: neither
    // the session key nor its card number may show up on the host side.
    let (skey, pan2) = ([0u8; 32], b"4000056655665556");
    let mut skey = skey;
    bubble_keys::RngCore::fill_bytes(&mut bubble_keys::OsRng, &mut skey);
    let (keys, code) = (b.keys().unwrap(), b.code().unwrap());
    let sid = b.next_seq();
    let aad = bubble_keys::session_aad(
        b.id(),
        &keys.kem_pk,
        &code.portions_digest,
        &code.policy_digest,
        sid,
    );
    let (k, setup) =
        bubble_keys::SessionKey::seal_key(&mut bubble_keys::OsRng, &keys.kem_pk, &aad, &skey)
            .unwrap();
    let call_aad = bubble_keys::session_call_aad(b.id(), "payments", "tokenize", sid, 1);
    let out = parent
        .grpc()
        .call(pb::CallRequest {
            bubble_id: b.id().to_string(),
            op: "tokenize".into(),
            portion: "payments".into(),
            session_input: Some(pb::SessionInput {
                session_id: sid,
                seq: 1,
                ciphertext: k.seal(1, &call_aad, pan2),
                setup: setup.encode(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(out.into_inner().output, tokenize(&key, pan2));
    let mut c = broker.client().await;
    suspend_and_restore(&mut c, b.id()).await;
    assert_eq!(
        payments.call("tokenize", pan).await.unwrap(),
        tokenize(&key, pan)
    );
    // Suspended again, so that the store holds a frozen copy to search.
    let s = c.suspend_bubble(suspend_req(b.id(), b"")).await.unwrap();
    assert_eq!(s.into_inner().state, pb::BubbleState::Suspended as i32);

    let t = traffic.lock().unwrap().clone();
    assert!(contains(&t, control), "the spy sees plaintext inputs");
    assert!(!contains(&t, pan), "card number in the gRPC traffic");
    assert!(
        !contains(&t, pan2),
        "session card number in the gRPC traffic"
    );
    assert!(!contains(&t, &skey), "session key in the gRPC traffic");
    assert!(
        contains(&t, &setup.encode()),
        "the spy sees the session setup"
    );
    let metrics = broker.admin_get("/metrics");
    assert!(metrics.contains("bubbled_"), "metrics scraped");
    for secret in [&pan[..], &pan2[..], &skey[..]] {
        assert!(
            !contains(metrics.as_bytes(), secret),
            "secret in the metrics"
        );
    }
    let log = std::fs::read(dir.path().join("broker.log")).unwrap();
    assert!(contains(&log, b"DEBUG"), "the broker logged at debug level");
    let mut searched = 0;
    for f in files_under(dir.path()) {
        if f.extension().is_some_and(|e| e == "sock") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap_or_default();
        for secret in [&pan[..], &pan2[..], &skey[..]] {
            assert!(!contains(&bytes, secret), "secret in {}", f.display());
        }
        searched += 1;
    }
    let names: Vec<String> = files_under(dir.path())
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("registry.redb"))
            && names.iter().any(|n| n.contains("store")),
        "registry and store searched: {names:?}"
    );
    assert!(searched > 3);
}
