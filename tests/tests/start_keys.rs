//! A bubble's READY comes at its guest's READY_EARLY, before the guest
//! has made its key pairs (docs/guest-abi.md, "Start-up"): a call made
//! the moment a create returns must still find the keys, and a guest that
//! never finishes its start-up must fail with the right reason while
//! other bubbles keep answering.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_client::{verify_attestation, Expectations, Parent};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};

/// The broker's name for this process on its Unix socket.
fn owner() -> String {
    use std::os::unix::fs::MetadataExt;
    format!("uid:{}", std::fs::metadata("/proc/self").unwrap().uid())
}

fn measurement(memory_mib: u32) -> [u8; 48] {
    let out = std::process::Command::new(ctl_bin())
        .args(["measure", "--memory-mib", &memory_mib.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    let s = s.trim();
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// Eight concurrent creates, each followed at once by an attestation
/// (raw GetAttestation with its own nonce, verified offline), an echo,
/// an attested provision of a sealed credential and a signed HMAC with
/// it: every report verifies and binds non-zero keys, and the keys it
/// binds are the ones the credential opens under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubbles_called_the_moment_they_are_created_have_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let ark = std::fs::read(dir.path().join("psp/ark.der")).unwrap();
    let m = measurement(16);
    let parent = Parent::connect_unix(&broker.socket).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let (parent, ark) = (parent.clone(), ark.clone());
        tasks.push(tokio::spawn(async move {
            let b = parent
                .grpc()
                .create_bubble(create_req(16))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(b.state, pb::BubbleState::Ready as i32, "{b:?}");
            // The first call, with no wait: an attestation.
            let nonce = [i.wrapping_add(1); 32];
            let a = parent
                .grpc()
                .get_attestation(pb::GetAttestationRequest {
                    bubble_id: b.bubble_id.clone(),
                    nonce: nonce.to_vec(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_ne!(a.kem_public_key, vec![0u8; 32], "zero KEM key");
            assert_ne!(a.sig_public_key, vec![0u8; 32], "zero signing key");
            let expect = Expectations::new(m, &b.bubble_id, &owner()).allow_sim();
            verify_attestation(&a, &nonce, &expect, Some(&ark)).unwrap();
            let out = parent
                .grpc()
                .call(call_req(&b.bubble_id, "echo", &[i; 64]))
                .await
                .unwrap()
                .into_inner()
                .output;
            assert_eq!(out, vec![i; 64]);
            // Attested again through the client, then a credential
            // sealed to the attested key opens inside and is used.
            let mut bubble = parent.bubble(&b.bubble_id);
            bubble.attest(&expect, Some(&ark)).await.unwrap();
            let keys = bubble.keys().unwrap();
            assert_eq!(keys.kem_pk.to_vec(), a.kem_public_key);
            let secret = [0x40 + i; 32];
            bubble.provision("api_key", &secret).await.unwrap();
            let mut input = vec![7u8];
            input.extend(b"api_key");
            input.extend(b"challenge");
            let mac = bubble.call_verified("hmac", &input).await.unwrap();
            let mut want = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&secret).unwrap();
            want.update(b"challenge");
            assert_eq!(mac, want.finalize().into_bytes().to_vec());
            b.bubble_id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);
}

/// A guest that says READY_EARLY and then spins: READY, then FAILED with
/// the boot deadline (not a call's), and a call made meanwhile never
/// reaches it; one that says READY_EARLY and then garbage: FAILED as an
/// ABI breach. A good bubble answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_finishes_its_start_up_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("boot_timeout_ms = 1500\n".into()),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let good = c.create_bubble(create_req(8)).await.unwrap().into_inner();
    assert_eq!(good.state, pb::BubbleState::Ready as i32);
    for (kind, want) in [
        ("early-spin", "guest did not boot within 1500 ms"),
        ("early-garbage", "bad message magic"),
    ] {
        // From a spare, as creates normally are (its client does not wait
        // for HELLO, whose answer comes after the start-up): the broker
        // starts spares one after the other, so with two listening the
        // older one is in its list.
        wait_spares_ready(dir.path(), 2, Duration::from_secs(30)).await;
        let t0 = std::time::Instant::now();
        let b = c
            .create_bubble(pb::CreateBubbleRequest {
                image: format!("test:{kind}"),
                ..create_req(8)
            })
            .await
            .unwrap()
            .into_inner();
        if kind == "early-spin" {
            // READY_EARLY is READY.
            assert_eq!(b.state, pb::BubbleState::Ready as i32, "{kind}: {b:?}");
            // A call in the window waits for the start-up, which never
            // ends: it fails with the bubble, never runs (its own
            // deadline of 10 s is not what ends it).
            let mut req = call_req(&b.bubble_id, "echo", b"x");
            req.deadline_ms = 10_000;
            let e = c.call(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Aborted, "{kind}: {e:?}");
            assert!(t0.elapsed() < Duration::from_secs(8), "{kind}: {e:?}");
        }
        let b = wait_for(&mut c, &b.bubble_id, Duration::from_secs(10), |b| {
            b.state == pb::BubbleState::Failed as i32
        })
        .await;
        assert!(
            b.failure_reason.contains(want),
            "{kind}: {}",
            b.failure_reason
        );
        let out = c
            .call(call_req(&good.bubble_id, "echo", kind.as_bytes()))
            .await
            .unwrap()
            .into_inner()
            .output;
        assert_eq!(out, kind.as_bytes());
    }
}

/// The guest fails right after READY_EARLY, while the create is still
/// finishing (held at `create.booted`, before the broker follows the
/// VMM's notices): the failure reported meanwhile is not lost, the
/// bubble is FAILED with the guest's reason (not, seconds later, with its
/// VMM's exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_between_ready_and_the_end_of_the_create_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: vec![("BUBBLED_TEST_PAUSE".into(), "create.booted=400".into())],
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(30)).await;
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            image: "test:early-garbage".into(),
            ..create_req(8)
        })
        .await
        .unwrap()
        .into_inner();
    let b = wait_for(&mut c, &b.bubble_id, Duration::from_secs(10), |b| {
        b.state == pb::BubbleState::Failed as i32
    })
    .await;
    assert!(
        b.failure_reason.contains("bad message magic"),
        "{}",
        b.failure_reason
    );
}
