//! Sealed sessions end to end on real KVM, written as the attacks: a
//! relay that replays, redirects or forges session calls, a parent that
//! opens a session for other code or too many sessions, a hostile parent
//! sending garbage session frames, and suspend/restore in between.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::{Bubble, ClientError, CodeBinding, Parent};
use bubble_e2e_tests::payments::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const PAN: &[u8] = b"4111111111111111";

fn session_req(b: &Bubble, function: &str, s: pb::SessionInput) -> pb::CallRequest {
    pb::CallRequest {
        bubble_id: b.id().to_string(),
        op: function.into(),
        portion: "payments".into(),
        session_input: Some(s),
        ..Default::default()
    }
}

/// A new handle on `b` (so a new session) trusting the same keys and code.
fn handle(parent: &Parent, b: &Bubble) -> Bubble {
    let mut h = parent.bubble(b.id());
    h.trust_keys(b.keys().unwrap());
    h.trust_code(b.code().unwrap());
    h
}

/// Whether `e` is the bubble refusing the session (not held / id reused),
/// as the broker marks it.
fn session_refused(e: &tonic::Status) -> bool {
    e.code() == Code::FailedPrecondition
        && e.metadata()
            .get(bubble_proto::SESSION_REFUSED_KEY)
            .is_some_and(|v| v == bubble_proto::SESSION_REFUSED_VALUE)
}

async fn assert_ready(c: &mut Client, id: &str) {
    let b = describe(c, id).await;
    assert_eq!(
        b.state,
        pb::BubbleState::Ready as i32,
        "{}",
        b.failure_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_calls_run_once_and_only_where_they_were_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    let key = [0x42u8; 32];
    let a = tokenizer(&parent, &key).await;
    let b = tokenizer(&parent, &[0x43; 32]).await;

    // A session's first call, setup included, sent eight times at once:
    // the session opens once and the call runs exactly once.
    let first = a.seal_session_input("payments", "tokenize", PAN).unwrap();
    assert!(!first.setup.is_empty(), "the first call carries the setup");
    let req = session_req(&a, "tokenize", first.clone());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut c, req) = (c.clone(), req.clone());
        tasks.push(tokio::spawn(async move { c.call(req).await }));
    }
    let (mut ok, mut replayed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().output, tokenize(&key, PAN));
                ok += 1;
            }
            Err(s) if s.code() == Code::AlreadyExists => replayed += 1,
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!((ok, replayed), (1, 7));
    a.session_accepted(first.session_id);
    // Later calls of the session leave the setup out; the same again, with
    // eight distinct calls sent at once: all run.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = a.seal_session_input("payments", "tokenize", PAN).unwrap();
        assert!(s.setup.is_empty());
        let (mut c, req) = (c.clone(), session_req(&a, "tokenize", s));
        tasks.push(tokio::spawn(async move { c.call(req).await }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap().into_inner().output,
            tokenize(&key, PAN)
        );
    }

    // Redirected to bubble B: with its setup, the setup does not open there
    // (other bubble id and key); without, B holds no such session.
    let e = c
        .call(session_req(&b, "tokenize", first.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("does not open"), "{e:?}");
    let later = a.seal_session_input("payments", "tokenize", PAN).unwrap();
    let e = c
        .call(session_req(&b, "tokenize", later.clone()))
        .await
        .unwrap_err();
    assert!(session_refused(&e), "{e:?}");
    // Another function, portion, seq or session id: does not open, and
    // spends nothing.
    let wrong_fn = session_req(&a, "sign_charge", later.clone());
    let mut wrong_portion = session_req(&a, "tokenize", later.clone());
    wrong_portion.portion = "hostile".into();
    let mut wrong_seq = later.clone();
    wrong_seq.seq += 1000;
    for (what, r) in [
        ("other function", wrong_fn),
        ("other portion", wrong_portion),
        ("other seq", session_req(&a, "tokenize", wrong_seq)),
    ] {
        let e = c.call(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("does not open"), "{what}: {e:?}");
    }
    let good = session_req(&a, "tokenize", later);
    assert_eq!(
        c.call(good.clone()).await.unwrap().into_inner().output,
        tokenize(&key, PAN)
    );
    assert_eq!(
        c.call(good.clone()).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    // Sequence numbers are per session: a second handle's session reuses
    // 1, 2, ... and both keep working; a ciphertext of one session under
    // the other's id does not open.
    let a2 = handle(&parent, &a);
    let s2 = a2.seal_session_input("payments", "tokenize", PAN).unwrap();
    assert_eq!(s2.seq, 1);
    assert_ne!(s2.session_id, first.session_id);
    assert_eq!(first.seq, 1);
    assert_eq!(
        c.call(session_req(&a, "tokenize", s2.clone()))
            .await
            .unwrap()
            .into_inner()
            .output,
        tokenize(&key, PAN)
    );
    a2.session_accepted(s2.session_id);
    // (A's session is further along: its next seq is one a2's session has
    // not used, so the refusal is the key's, not the window's.)
    let mut crossed = a.seal_session_input("payments", "tokenize", PAN).unwrap();
    assert!(crossed.seq > 2);
    crossed.session_id = s2.session_id;
    let e = c
        .call(session_req(&a, "tokenize", crossed))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for h in [&a, &a2] {
        assert_eq!(
            h.portion("payments").call("tokenize", PAN).await.unwrap(),
            tokenize(&key, PAN)
        );
    }

    // After suspend and restore: the session still works without a new
    // setup, and its replays are still refused.
    suspend_and_restore(&mut c, a.id()).await;
    assert_eq!(c.call(good).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(c.call(req).await.unwrap_err().code(), Code::AlreadyExists);
    let s = a.seal_session_input("payments", "tokenize", PAN).unwrap();
    assert!(s.setup.is_empty());
    assert_eq!(
        c.call(session_req(&a, "tokenize", s))
            .await
            .unwrap()
            .into_inner()
            .output,
        tokenize(&key, PAN)
    );
    for x in [a, b, a2] {
        assert_ready(&mut c, x.id()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_binds_the_code_and_freezes_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    // Code loaded, not attested, no credential: not frozen yet.
    let mut b = payments_bubble(&parent).await;
    let d1: [u8; 48] = b
        .load_portion("payments", &module(PAYMENTS))
        .await
        .unwrap()
        .try_into()
        .unwrap();
    let keys = b.fetch_keys_unverified().await.unwrap();
    b.trust_keys(keys);
    // A session for other digests (another portions set, another policy)
    // does not open, and freezes nothing.
    for code in [
        CodeBinding {
            portions_digest: [7; 48],
            policy_digest: policy_digest(),
        },
        CodeBinding {
            portions_digest: d1,
            policy_digest: [7; 32],
        },
    ] {
        let h = handle_with(&parent, &b, code);
        let e = h
            .portion("payments")
            .call("tokenize", PAN)
            .await
            .unwrap_err();
        match e {
            ClientError::Status { code, message } => {
                assert_eq!(code, Code::InvalidArgument, "{message}");
                assert!(message.contains("does not open"), "{message}");
            }
            e => panic!("{e}"),
        }
    }
    let d2: [u8; 48] = b
        .load_portion("hostile", &module(HOSTILE))
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_ne!(d1, d2);
    // A session for the code as it is now opens (the call itself is then
    // refused by the portion: no credential yet) and freezes the code: no
    // swap can follow a session.
    b.trust_code(CodeBinding {
        portions_digest: d2,
        policy_digest: policy_digest(),
    });
    let s = b.seal_session_input("payments", "tokenize", PAN).unwrap();
    let e = c
        .call(session_req(&b, "tokenize", s.clone()))
        .await
        .unwrap_err();
    assert!(
        !session_refused(&e) && e.code() != Code::InvalidArgument,
        "{e:?}"
    );
    let e = b
        .load_portion("payments", &module(HOSTILE))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Status {
                code: Code::FailedPrecondition,
                ..
            }
        ),
        "{e}"
    );
    // The session is held: its next call needs no setup.
    let mut next = b.seal_session_input("payments", "tokenize", PAN).unwrap();
    next.setup.clear();
    let e = c.call(session_req(&b, "tokenize", next)).await.unwrap_err();
    assert!(!session_refused(&e), "{e:?}");
    assert_ready(&mut c, b.id()).await;
}

fn handle_with(parent: &Parent, b: &Bubble, code: CodeBinding) -> Bubble {
    let mut h = parent.bubble(b.id());
    h.trust_keys(b.keys().unwrap());
    h.trust_code(code);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sessions_evict_the_oldest_which_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    let key = [0x44u8; 32];
    let a = tokenizer(&parent, &key).await;
    let oldest = handle(&parent, &a);
    let opening = oldest
        .seal_session_input("payments", "tokenize", PAN)
        .unwrap();
    let opening_req = session_req(&a, "tokenize", opening.clone());
    c.call(opening_req.clone()).await.unwrap();
    oldest.session_accepted(opening.session_id);
    // 64 more sessions (the bubble holds 64): the first is evicted.
    let mut handles = Vec::new();
    for _ in 0..64 {
        let h = handle(&parent, &a);
        assert_eq!(
            h.portion("payments").call("tokenize", PAN).await.unwrap(),
            tokenize(&key, PAN)
        );
        handles.push(h);
    }
    let s = oldest
        .seal_session_input("payments", "tokenize", PAN)
        .unwrap();
    let e = c.call(session_req(&a, "tokenize", s)).await.unwrap_err();
    assert!(session_refused(&e), "{e:?}");
    // Replaying its setup cannot bring it back (its window would start
    // empty): the id was used.
    let e = c.call(opening_req).await.unwrap_err();
    assert!(session_refused(&e), "{e:?}");
    // The library opens a new session by itself (on the refusal) and the
    // call runs; the newest sessions still work.
    assert_eq!(
        oldest
            .portion("payments")
            .call("tokenize", PAN)
            .await
            .unwrap(),
        tokenize(&key, PAN)
    );
    assert_eq!(
        handles
            .last()
            .unwrap()
            .portion("payments")
            .call("tokenize", PAN)
            .await
            .unwrap(),
        tokenize(&key, PAN)
    );
    assert_ready(&mut c, a.id()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_session_frames_are_refused_and_the_bubble_lives() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let parent = Parent::from_client(c.clone());
    let key = [0x45u8; 32];
    let a = tokenizer(&parent, &key).await;
    let good = a.seal_session_input("payments", "tokenize", PAN).unwrap();
    let mut garbage = Vec::new();
    let with = |f: &dyn Fn(&mut pb::SessionInput)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    garbage.push(with(&|s| s.session_id = 0));
    garbage.push(with(&|s| s.seq = 0));
    garbage.push(with(&|s| s.ciphertext.truncate(15)));
    garbage.push(with(&|s| s.setup.truncate(20)));
    garbage.push(with(&|s| s.setup = vec![0xee; 300]));
    garbage.push(with(&|s| s.setup = vec![0x01; 83]));
    garbage.push(with(&|s| {
        s.setup[40] ^= 1;
    }));
    garbage.push(with(&|s| {
        s.setup[3] ^= 1;
    }));
    // The authentic setup opens the session; the call still does not run.
    garbage.push(with(&|s| s.ciphertext = vec![0xff; 40]));
    garbage.push(with(&|s| s.seq = u64::MAX));
    garbage.push(with(&|s| s.session_id += 1));
    for (i, g) in garbage.into_iter().enumerate() {
        let e = c.call(session_req(&a, "tokenize", g)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "garbage {i}: {e:?}");
    }
    // Beside a plaintext or single-shot input, or on a built-in op: refused
    // by the broker.
    let mut both = session_req(&a, "tokenize", good.clone());
    both.input = PAN.to_vec();
    let mut builtin = session_req(&a, "tokenize", good.clone());
    builtin.portion.clear();
    builtin.op = "echo".into();
    for r in [both, builtin] {
        assert_eq!(c.call(r).await.unwrap_err().code(), Code::InvalidArgument);
    }
    // None of it spent the good call's number (a garbage call with the
    // authentic setup opened the session, which the good call then uses).
    assert_eq!(
        c.call(session_req(&a, "tokenize", good))
            .await
            .unwrap()
            .into_inner()
            .output,
        tokenize(&key, PAN)
    );
    assert_ready(&mut c, a.id()).await;
}
