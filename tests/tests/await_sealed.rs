//! Await and sealed results, on real KVM: a trigger that seals its results
//! to the parent's key runs a portion that awaits; the call is frozen on
//! broker A and resumed on broker B (one local store); the result B
//! publishes is marked sealed, carries the digest of the original call's
//! frame, verifies as the bubble's, and `bubblectl results --key-file`
//! opens it — on B, and on A, where the trigger that started the call
//! is (relayed encrypted through the shared store, which never holds the
//! plaintext).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use bubble_e2e_tests::awaits::*;
use bubble_e2e_tests::triggers::{publish, sig_pk};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

/// A trigger on `subject` running `aw.pay` in `bubble`, sealed to `key`.
async fn sealed_trigger(c: &mut Client, subject: &str, bubble: &str, key: &[u8; 32]) -> String {
    c.create_trigger(pb::CreateTriggerRequest {
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "aw".into(),
        function: "pay".into(),
        seal_to: key.to_vec(),
        ..Default::default()
    })
    .await
    .expect("create trigger")
    .into_inner()
    .trigger_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_trigger_whose_portion_awaits_yields_a_result_the_cli_opens() {
    let Some(p) = pair_on(false, [None, None], "") else {
        return;
    };
    let mut a = p.brokers[0].client().await;
    let mut b = p.brokers[1].client().await;
    let parent_key = bubble_keys::KemKeyPair::generate(&mut bubble_keys::OsRng);
    let key_file = p.dirs[0].path().join("seal.key");
    std::fs::write(
        &key_file,
        parent_key
            .secret_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let bubble = await_bubble(&mut a).await;
    let pk = sig_pk(&mut a, &bubble).await;
    let ta = sealed_trigger(&mut a, "pay", &bubble, &parent_key.public_key()).await;
    let b_bubble = await_bubble(&mut b).await;
    let tb = sealed_trigger(&mut b, "pay", &b_bubble, &parent_key.public_key()).await;

    assert!(publish(&mut a, "pay", "order-13", b"cap-13").await);
    wait_frozen(&mut a, p.dirs[0].path(), &bubble).await;
    let secret = b"captured-secret-1300";
    assert!(publish(&mut b, "pay", "cap-13", secret).await);
    let r = wait_result_in(&mut b, &tb, "order-13", LIMIT, Some(p.dirs[1].path())).await;
    assert_eq!(r.outcome, "ok", "{r:?}");
    assert!(r.sealed, "the resumed result is not marked sealed: {r:?}");
    let frame = bubble_abi::ops::PortionCall {
        portion: "aw",
        function: "pay",
        input: b"cap-13",
    }
    .encode()
    .unwrap();
    assert_eq!(r.input_sha256, bubble_keys::sha256(&frame).to_vec());
    let want = b"cap-13|captured-secret-1300";
    let plain = bubble_keys::verify_and_open_result(
        &pk,
        &r.bubble_id,
        r.call_id,
        &frame,
        &r.output,
        &r.signature,
        Some(&parent_key),
    )
    .expect("the parent opens the resumed result");
    assert_eq!(plain.expose(), want);
    assert!(
        !r.output.windows(secret.len()).any(|w| w == secret),
        "the stored output holds the plaintext"
    );
    // The CLI opens it with the key file, on the broker that has it.
    let out = std::process::Command::new(ctl_bin())
        .arg("--socket")
        .arg(&p.brokers[1].socket)
        .args(["results", &tb, "order-13", "--output", "raw", "--key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, want, "{out:?}");
    // The resuming event's result is the same sealed one.
    let rc = wait_result(&mut b, &tb, "cap-13", LIMIT).await;
    assert!(rc.sealed && rc.output == r.output, "{rc:?}");
    // The owner reads it on A too, through the trigger that started the
    // call (relayed through the shared store, encrypted), and the CLI
    // opens it there.
    let ra = wait_result_in(&mut a, &ta, "order-13", LIMIT, Some(p.dirs[0].path())).await;
    assert_eq!(ra, r, "A's copy differs from B's");
    let out = std::process::Command::new(ctl_bin())
        .arg("--socket")
        .arg(&p.brokers[0].socket)
        .args(["results", &ta, "order-13", "--output", "raw", "--key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, want, "{out:?}");
    // Relayed as ciphertext: the shared store never holds the plaintext.
    let store = p._store.as_ref().unwrap().path();
    assert!(
        files_with(store, want).is_empty(),
        "plaintext in the shared store"
    );
}

/// Files under `dir` whose bytes contain `needle`.
fn files_with(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
