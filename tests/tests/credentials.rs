//! End to end on real KVM: credentials sealed to a bubble, used inside it,
//! and never visible to the host in plaintext; signed and sealed results.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::{ClientError, Parent};
use bubble_e2e_tests::spy::{contains, files_under, recording_proxy};
use bubble_e2e_tests::*;
use hmac::{Hmac, Mac};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_is_used_inside_and_never_seen_by_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let proxy_sock = dir.path().join("proxy.sock");
    let traffic = recording_proxy(broker.socket.clone(), proxy_sock.clone()).await;
    let parent = Parent::connect_unix(&proxy_sock).await.unwrap();

    let mut bubble = parent.create(16).await.unwrap();
    // Before keys are trusted nothing can be sealed or verified.
    assert!(matches!(
        bubble.provision("tokenization_key", b"x").await,
        Err(ClientError::NotAttested)
    ));
    let (keys, _) = bubble.trust_unverified().await.unwrap();

    let secret = b"tok-key:7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e";
    bubble.provision("tokenization_key", secret).await.unwrap();

    let pan = b"4111111111111111";
    let mut input = vec![b"tokenization_key".len() as u8];
    input.extend(b"tokenization_key");
    input.extend(pan);
    let token = bubble.call_verified("hmac", &input).await.unwrap();
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(pan);
    assert_eq!(token, m.finalize().into_bytes().to_vec());

    // The name keeps its value: provisioning it again is refused and the
    // bubble goes on using the first key.
    let again = bubble
        .provision("tokenization_key", b"a key the parent chose")
        .await;
    assert!(again.is_err(), "re-provisioning a name is refused");
    assert_eq!(bubble.call_verified("hmac", &input).await.unwrap(), token);

    // Sealed to the parent: the broker relays only ciphertext.
    let sealed_token = bubble.call_sealed("hmac", &input).await.unwrap();
    assert_eq!(sealed_token.expose(), &token[..]);

    // An unknown credential is refused without hurting the bubble.
    let mut other = vec![5u8];
    other.extend(b"other");
    other.extend(pan);
    assert!(bubble.call("hmac", &other).await.is_err());
    assert_eq!(bubble.call("echo", b"alive").await.unwrap(), b"alive");

    // A result signed by another key does not verify.
    let mut forged = bubble_client::Parent::bubble(&parent, bubble.id());
    forged.trust_keys(bubble_client::BubbleKeys {
        kem_pk: keys.kem_pk,
        sig_pk: bubble_keys::SigningKeyPair::generate(&mut bubble_keys::OsRng).public_key(),
    });
    assert!(matches!(
        forged.call_verified("echo", b"x").await,
        Err(ClientError::BadResult(_))
    ));

    // The plaintext is nowhere on the host side: not in the gRPC traffic,
    // the registry, the broker's or the VMM's logs, or any file of the
    // broker's data directory.
    let t = traffic.lock().unwrap().clone();
    assert!(t.len() > 1000, "the proxy saw the traffic");
    assert!(
        !contains(&t, secret),
        "plaintext credential in gRPC traffic"
    );
    for f in files_under(dir.path()) {
        if f.extension().is_some_and(|e| e == "sock") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !contains(&bytes, secret),
            "plaintext credential in {}",
            f.display()
        );
    }
    bubble.delete().await.unwrap();
}
