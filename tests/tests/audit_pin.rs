//! End to end: the audit log's last checkpoint is pinned in the registry,
//! so a broker refuses to start on a log cut back to an earlier point (an
//! earlier checkpoint included), or deleted, and says why; the whole log
//! starts again.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_e2e_tests::*;

/// Starts the broker, creates and deletes a bubble (lifecycle records),
/// stops it cleanly (a final checkpoint, pinned).
async fn run_once(dir: &std::path::Path) {
    let mut broker = BrokerProc::start(dir, false);
    let mut c = broker.client().await;
    let id = c
        .create_bubble(create_req(8))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    c.delete_bubble(bubble_proto::v1::BubbleRef { bubble_id: id })
        .await
        .unwrap();
    drop(c);
    assert!(broker.terminate().unwrap().success());
}

/// Starts `bubbled` on `dir` directly; its exit status and stderr when it
/// refuses (a broker that starts is stopped and reported as started).
fn start_refused(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir)
        .arg("--allow-test-images")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the broker ran on a cut log: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refuses_an_audit_log_cut_back_before_its_pinned_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    run_once(dir.path()).await;
    run_once(dir.path()).await;
    let log = dir.path().join("audit").join("audit.log");
    let good = std::fs::read(&log).unwrap();
    let (recs, _) = bubble_audit::records(&good).unwrap();
    let checkpoints: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, (_, r, _))| matches!(r.what, bubble_audit::What::Checkpoint { .. }))
        .map(|(i, _)| i)
        .collect();
    assert!(
        checkpoints.len() >= 2,
        "one checkpoint per clean stop: {checkpoints:?}"
    );
    // Whole-record cuts: just after the first run's final checkpoint (a
    // valid, signed log), just before the last checkpoint, in the middle,
    // at the first record; and the log deleted.
    let end_of = |i: usize| recs.get(i + 1).map_or(good.len(), |r| r.0 as usize);
    let first_cp = checkpoints[checkpoints.len() - 2];
    let last_cp = checkpoints[checkpoints.len() - 1];
    for cut in [
        end_of(first_cp),
        recs[last_cp].0 as usize,
        end_of(recs.len() / 2),
        0,
    ] {
        bubble_audit::verify(&good[..cut], None).unwrap();
        std::fs::write(&log, &good[..cut]).unwrap();
        let err = start_refused(dir.path());
        assert!(
            err.contains("truncated or replaced") && err.contains("pins checkpoint"),
            "cut at byte {cut}: {err}"
        );
    }
    std::fs::remove_file(&log).unwrap();
    let err = start_refused(dir.path());
    assert!(err.contains("truncated or replaced"), "deleted: {err}");
    // The whole log: the broker starts and extends it.
    std::fs::write(&log, &good).unwrap();
    run_once(dir.path()).await;
    assert!(std::fs::read(&log).unwrap().len() > good.len());

    // An operator who moved a damaged log aside starts a new one with
    // --audit-new-log: refused while the log is still there; afterwards
    // the new log's first record names the checkpoint it replaces, and it
    // is pinned in turn.
    let out = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--audit-new-log")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("move it aside first"),
        "{out:?}"
    );
    std::fs::rename(&log, dir.path().join("old-audit.log")).unwrap();
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            args: vec!["--audit-new-log".into()],
            ..Opts::default()
        },
    );
    assert!(broker.terminate().unwrap().success());
    let fresh = std::fs::read(&log).unwrap();
    let (recs, _) = bubble_audit::records(&fresh).unwrap();
    assert!(
        matches!(&recs[0].1.what, bubble_audit::What::Lifecycle { state, reason }
            if state == "audit_log_replaced" && reason.contains("pinned checkpoint was seq")),
        "{:?}",
        recs[0]
    );
    run_once(dir.path()).await;
    std::fs::write(&log, &fresh).unwrap();
    let err = start_refused(dir.path());
    assert!(err.contains("truncated or replaced"), "{err}");
}

/// The unsigned tail holds no security record: each is signed in its own
/// write (a checkpoint right after it, pinned in the registry), so a log
/// whose tail was cut after a SIGKILL, removing a security event that the
/// periodic checkpoint (every 1024 records or 10 s) had not reached yet,
/// is refused at start, naming the pinned checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_security_record_is_refused_at_start() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), true);
    let mut m = broker.tls_client("parent-b").await;
    let log = dir.path().join("audit").join("audit.log");
    // (index of each security record, whether a checkpoint follows it).
    let signed = |log: &std::path::Path| {
        let bytes = std::fs::read(log).unwrap();
        let (recs, _) = bubble_audit::records(&bytes).unwrap();
        let mut out = Vec::new();
        for (i, (_, r, _)) in recs.iter().enumerate() {
            if matches!(r.what, bubble_audit::What::Security { .. }) {
                let cp = recs[i + 1..]
                    .iter()
                    .find(|(_, r, _)| matches!(r.what, bubble_audit::What::Checkpoint { .. }))
                    .map(|(_, r, _)| r.seq);
                out.push((i, cp));
            }
        }
        out
    };
    for n in 1..=2usize {
        let id = format!("b-{:032x}", 0xfeed_0000u64 + n as u64);
        let e = m
            .describe_bubble(bubble_proto::v1::BubbleRef { bubble_id: id })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // The writer thread pins a checkpoint before it writes the next
        // batch: once the second is signed, the first one's pin is durable.
        wait_until(
            "a signed security record",
            Duration::from_secs(5),
            || signed(&log),
            |s| s.len() == n && s.iter().all(|(_, cp)| cp.is_some()),
        )
        .await;
    }
    drop(m);
    broker.kill();
    let good = std::fs::read(&log).unwrap();
    let (recs, _) = bubble_audit::records(&good).unwrap();
    let s = signed(&log);
    let (first, cp) = s[0];
    let cut = recs[first].0 as usize;
    // Offline the cut log is a valid chain (what the pin is for).
    bubble_audit::verify(&good[..cut], None).unwrap();
    std::fs::write(&log, &good[..cut]).unwrap();
    let err = start_refused(dir.path());
    let second = s[1].1.unwrap();
    assert!(
        err.contains("truncated or replaced")
            && [cp.unwrap(), second]
                .iter()
                .any(|seq| err.contains(&format!("pins checkpoint {seq},"))),
        "{err}"
    );
}
