//! End to end over mutual TLS: a revoked client certificate ends the
//! response streams it already has open (`WatchEvents`, `StreamLogs`
//! with follow, `AdminWatchEvents`) with UNAUTHENTICATED within a bounded
//! time, not only its next request; another parent's streams go on.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

/// Reads `s` until it ends; the status it ended with (within `limit`).
async fn ends_with<T: std::fmt::Debug>(
    what: &str,
    s: &mut tonic::Streaming<T>,
    limit: Duration,
) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Err(_) => panic!("{what}: still open {limit:?} after the revocation"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("{what}: ended without a status"),
            Ok(Err(st)) => return st,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_ends_its_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some("admins = [\"cert:parent-a\"]\n".into()),
            ..Opts::default()
        },
    );
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let id = a
        .create_bubble(create_req(8))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let mut events = a
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut logs = a
        .stream_logs(pb::StreamLogsRequest {
            bubble_id: id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut admin = a
        .admin_watch_events(pb::AdminWatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut theirs = b
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let pki = dir.path().join("pki");
    let (cert, _) = bubbled::pki::parent_files(&pki, "parent-a");
    let der = bubbled::revoked::cert_der(&cert).unwrap();
    bubbled::revoked::revoke(&pki, &der, "parent-a").unwrap();

    // The bound is STREAM_RECHECK (500 ms); the limit leaves room for a
    // loaded host.
    let limit = Duration::from_secs(5);
    for (what, st) in [
        (
            "WatchEvents",
            ends_with("WatchEvents", &mut events, limit).await,
        ),
        (
            "StreamLogs",
            ends_with("StreamLogs", &mut logs, limit).await,
        ),
        (
            "AdminWatchEvents",
            ends_with("AdminWatchEvents", &mut admin, limit).await,
        ),
    ] {
        assert_eq!(st.code(), Code::Unauthenticated, "{what}: {st:?}");
        assert!(st.message().contains("revoked"), "{what}: {st:?}");
    }
    // Its next request is refused too; the other parent's stream is open
    // and still delivers.
    let e = a
        .describe_bubble(pb::BubbleRef { bubble_id: id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mine = b.create_bubble(create_req(8)).await.unwrap().into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(5), theirs.message())
        .await
        .expect("parent-b's stream stayed silent")
        .unwrap()
        .expect("parent-b's stream ended");
    assert_eq!(ev.bubble_id, mine.bubble_id);
}
