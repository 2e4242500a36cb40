//! End to end on real KVM: a portion's log lines reach its bubble's owner
//! (kept lines, then followed ones) and no one else.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const TALKER: &str = r#"(module
  (import "bubble_v1" "log" (func $log (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello from the portion")
  (func (export "hello") (result i32)
    (drop (call $log (i32.const 0) (i32.const 22)))
    (i32.const 0)))"#;

const LINE: &str = "hello from the portion";

async fn next_line(s: &mut tonic::Streaming<pb::LogLine>) -> pb::LogLine {
    loop {
        let l = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("no log line within 5 s")
            .unwrap()
            .expect("stream open");
        if l.text == LINE {
            return l;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portions_logs_reach_its_owner_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), true);
    let mut a = broker.tls_client("parent-a").await;
    let mut b = broker.tls_client("parent-b").await;
    let id = a
        .create_bubble(create_req(16))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let theirs = b
        .create_bubble(create_req(16))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    a.load_portion(pb::LoadPortionRequest {
        bubble_id: id.clone(),
        name: "talker".into(),
        module: wat::parse_str(TALKER).unwrap(),
    })
    .await
    .unwrap();
    let mut follow = a
        .stream_logs(pb::StreamLogsRequest {
            bubble_id: id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    // Another parent: refused, for a follow as for a read.
    for follow in [false, true] {
        let e = b
            .stream_logs(pb::StreamLogsRequest {
                bubble_id: id.clone(),
                follow,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    for _ in 0..3 {
        a.call(portion_call(&id, "talker", "hello", b"input-never-logged"))
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(next_line(&mut follow).await.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Kept lines, without follow: the stream ends after them.
    let kept: Vec<pb::LogLine> = {
        let mut s = a
            .stream_logs(pb::StreamLogsRequest {
                bubble_id: id.clone(),
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut v = Vec::new();
        while let Some(l) = s.message().await.unwrap() {
            v.push(l);
        }
        v
    };
    let hello: Vec<u64> = kept
        .iter()
        .filter(|l| l.text == LINE)
        .map(|l| l.seq)
        .collect();
    assert_eq!(hello, seqs);
    assert!(kept.iter().all(|l| !l.text.contains("input-never-logged")));
    // The other parent's own bubble has none of them.
    let mut s = b
        .stream_logs(pb::StreamLogsRequest {
            bubble_id: theirs,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(l) = s.message().await.unwrap() {
        assert_ne!(l.text, LINE);
    }
    // bubblectl logs, as the owner.
    let url = format!("https://localhost:{}", broker.tls.unwrap().port());
    let pki = dir.path().join("pki");
    let ctl = |parent: &str| {
        std::process::Command::new(ctl_bin())
            .args(["--json", "--endpoint", &url, "--pki", pki.to_str().unwrap()])
            .args(["--parent", parent, "logs", &id])
            .output()
            .unwrap()
    };
    let out = ctl("parent-a");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches(LINE).count(), 3, "{text}");
    assert_eq!(ctl("parent-b").status.code(), Some(17));
}
