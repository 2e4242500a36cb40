//! The frozen-bubble store on a real S3-compatible server (moto, started
//! here on loopback). Skipped, with the reason printed, where moto cannot
//! start (`.ci/run` installs it from PyPI).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_e2e_tests::moto::{http, start_moto};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_restore_through_s3() {
    let (moto, port) = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            missing_dependency(&format!("no S3-compatible server: {e}"));
            return;
        }
    };
    let created = http(port, "PUT", "/bubbles").unwrap_or_default();
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "test".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec![
                "--store".into(),
                format!("s3://bubbles/host-a?endpoint=http://127.0.0.1:{port}"),
            ],
            env,
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id.clone();
    c.call(call_req(&id, "echo", &vec![7u8; 100_000]))
        .await
        .unwrap();
    let s = c
        .suspend_bubble(pb::SuspendBubbleRequest {
            bubble_id: id.clone(),
            kek: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::BubbleState::Suspended as i32);
    // The objects are in the bucket.
    let listing = http(port, "GET", "/bubbles?list-type=2").unwrap_or_default();
    assert!(
        listing.contains(&format!("host-a/frozen/{id}/g1/manifest")),
        "{listing}"
    );
    assert!(listing.contains("chunk-0"));
    let r = c
        .restore_bubble(pb::RestoreBubbleRequest {
            bubble_id: id.clone(),
            kek: vec![],
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::BubbleState::Ready as i32);
    let out = c
        .call(call_req(&id, "echo", b"back from S3"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"back from S3");
    // Consumed: the manifest is gone from the bucket.
    let listing = http(port, "GET", "/bubbles?list-type=2").unwrap_or_default();
    assert!(!listing.contains("manifest"), "{listing}");
    drop(broker);
    drop(moto);
}
