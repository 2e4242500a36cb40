//! Results sealed to the parent, end to end on real KVM and a real
//! `nats-server -js`: a trigger with `seal_to` has the bubble seal each
//! output to the parent's key; the broker's files (the queue and
//! registry) and the NATS server's store never hold the plaintext output,
//! `GetResult` returns ciphertext with a valid signature over it, and the
//! parent (and `bubblectl results --key-file`) opens it.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_client::Parent;
use bubble_e2e_tests::triggers::*;
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};
use tonic::Code;

const PAYMENTS: &str = include_str!("../../examples/payments/payments.wat");
const LIMIT: Duration = Duration::from_secs(60);
const PAN: &[u8] = b"4111111111111111";

/// Every file under `dir` that contains `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle) {
                    out.push(p.display().to_string());
                }
            }
        }
    }
    out
}

/// A bubble whose policy grants the payments portion its key, with the
/// portion loaded and `key` provisioned.
async fn payments_bubble(c: &mut Client, key: &[u8]) -> String {
    let b = c
        .create_bubble(pb::CreateBubbleRequest {
            policy: Some(pb::SecurityPolicy {
                grants: vec![pb::CredentialGrant {
                    portion: "payments".into(),
                    credentials: vec!["tokenization_key".into()],
                }],
                ..Default::default()
            }),
            ..create_req(16)
        })
        .await
        .unwrap()
        .into_inner();
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

async fn publish_retrying(c: &mut Client, subject: &str, key: &str) {
    let end = Instant::now() + LIMIT;
    loop {
        match c
            .publish_event(pb::PublishEventRequest {
                subject: subject.into(),
                key: key.into(),
                payload: PAN.to_vec(),
            })
            .await
        {
            Ok(_) => return,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("publish: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_results_are_ciphertext_everywhere_but_in_the_parents_hands() {
    let Some(nats) = bubble_e2e_tests::nats::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some(format!("[events]\nnats_url = {:?}\n", nats.url)),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let card_key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(11)).collect();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&card_key).unwrap();
    mac.update(PAN);
    let token = mac.finalize().into_bytes().to_vec();

    // The parent's sealing key, in a 0600 file for the CLI.
    let parent_key = bubble_keys::KemKeyPair::generate(&mut bubble_keys::OsRng);
    let key_file = dir.path().join("seal.key");
    std::fs::write(&key_file, hex(&parent_key.secret_bytes()[..])).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    let bubble = payments_bubble(&mut c, &card_key).await;
    let pk = sig_pk(&mut c, &bubble).await;
    let bad = c
        .create_trigger(pb::CreateTriggerRequest {
            seal_to: vec![1; 31],
            ..tokenize_req("pay.bad", &bubble, "embedded")
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("seal_to"), "{bad:?}");

    let mut triggers = Vec::new();
    for (subject, source) in [("pay.local", "embedded"), ("pay.nats", "nats")] {
        let t = c
            .create_trigger(pb::CreateTriggerRequest {
                seal_to: parent_key.public_key().to_vec(),
                ..tokenize_req(subject, &bubble, source)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.seal_to, parent_key.public_key().to_vec());
        publish_retrying(&mut c, subject, "o-1").await;
        triggers.push(t.trigger_id);
    }
    for t in &triggers {
        let r = results(&mut c, t, &["o-1".to_string()], LIMIT)
            .await
            .pop()
            .unwrap();
        assert_eq!(r.outcome, "ok", "{r:?}");
        assert!(r.sealed, "{r:?}");
        assert!(
            !r.output.windows(token.len()).any(|w| w == token.as_slice()),
            "the stored output holds the plaintext"
        );
        // Signed over the ciphertext, opened by the parent only.
        let frame = bubble_abi::ops::PortionCall {
            portion: "payments",
            function: "tokenize",
            input: PAN,
        }
        .encode()
        .unwrap();
        assert_eq!(r.input_sha256, bubble_keys::sha256(&frame).to_vec());
        let plain = bubble_keys::verify_and_open_result(
            &pk,
            &r.bubble_id,
            r.call_id,
            &frame,
            &r.output,
            &r.signature,
            Some(&parent_key),
        )
        .unwrap();
        assert_eq!(plain.expose(), token.as_slice());
        // Another key does not open it.
        let other = bubble_keys::KemKeyPair::generate(&mut bubble_keys::OsRng);
        assert!(bubble_keys::verify_and_open_result(
            &pk,
            &r.bubble_id,
            r.call_id,
            &frame,
            &r.output,
            &r.signature,
            Some(&other),
        )
        .is_err());

        // The CLI opens it with the key file.
        let out = std::process::Command::new(ctl_bin())
            .arg("--socket")
            .arg(&broker.socket)
            .args(["results", t, "o-1", "--output", "hex", "--key-file"])
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            hex(&token),
            "{out:?}"
        );
    }

    // Nowhere at rest in the clear: not in the broker's data directory
    // (queue, registry, logs), not in the NATS server's store. The
    // ciphertext is there (the search works).
    let nats_store = nats.store_dir();
    for d in [dir.path(), nats_store] {
        let leaked = files_holding(d, &token);
        assert!(leaked.is_empty(), "plaintext result in {leaked:?}");
    }
    for (t, d) in [(&triggers[0], dir.path()), (&triggers[1], nats_store)] {
        let r = results(&mut c, t, &["o-1".to_string()], LIMIT)
            .await
            .pop()
            .unwrap();
        assert!(
            !files_holding(d, &r.output[r.output.len() - 16..]).is_empty(),
            "the sealed result is stored under {}",
            d.display()
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tokenize_req(subject: &str, bubble: &str, source: &str) -> pb::CreateTriggerRequest {
    pb::CreateTriggerRequest {
        source: source.into(),
        subject: subject.into(),
        bubble_id: bubble.into(),
        portion: "payments".into(),
        function: "tokenize".into(),
        ..Default::default()
    }
}
