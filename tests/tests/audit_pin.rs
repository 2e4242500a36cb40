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
    use std::io::Read;
    let mut child = std::process::Command::new(broker_bin())
        .arg("--data-dir")
        .arg(dir)
        .arg("--allow-test-images")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A broker that starts never exits by itself: fail, do not hang.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker ran on a cut log");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "the broker ran on a cut log: {err}");
    err
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
    for cut in [end_of(first_cp), end_of(recs.len() / 2), 0] {
        bubble_audit::verify(&good[..cut], None).unwrap();
        std::fs::write(&log, &good[..cut]).unwrap();
        let err = start_refused(dir.path());
        assert!(
            err.contains("truncated or replaced") && err.contains("pins checkpoint"),
            "cut at byte {cut}: {err}"
        );
    }
    // Just before the last checkpoint: that batch (the clean stop's) was
    // staged in the registry before it was written, so it is appended
    // back, marked `restored`, instead of refused.
    std::fs::write(&log, &good[..recs[last_cp].0 as usize]).unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    assert!(broker.terminate().unwrap().success());
    let good = std::fs::read(&log).unwrap();
    let (back, _) = bubble_audit::records(&good).unwrap();
    assert_eq!(
        back[last_cp].2, recs[last_cp].2,
        "the same checkpoint, back"
    );
    assert!(back.iter().any(|(_, r, _)| matches!(&r.what,
        bubble_audit::What::Lifecycle { state, .. } if state == bubble_audit::RESTORED)));
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

/// The security records of a log, and whether it holds a `restored` mark.
fn security_and_restored(log: &std::path::Path) -> (usize, bool) {
    let bytes = std::fs::read(log).unwrap();
    let (recs, _) = bubble_audit::records(&bytes).unwrap();
    let sec = recs
        .iter()
        .filter(|(_, r, _)| matches!(&r.what, bubble_audit::What::Security { kind } if kind == "foreign_access"))
        .count();
    let restored = recs.iter().any(|(_, r, _)| {
        matches!(&r.what, bubble_audit::What::Lifecycle { state, .. }
            if state == bubble_audit::RESTORED)
    });
    (sec, restored)
}

/// A kill at each step of a security record's write loses nothing: the
/// broker dies (abort, fault injection) after the batch holding it was
/// staged in the registry but before the log got it, and after the log's
/// fsync but before the pin moved; each time the log is also cut back to
/// before the record while the broker is down (what an attacker with the
/// disk could do in that window). The next broker appends the record back
/// from the registry (marked `restored`), the log verifies, and from then
/// on cutting the record off is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_each_step_of_a_security_write_loses_nothing() {
    use std::time::Duration;
    for point in ["audit.die_after_stage", "audit.die_after_fsync"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit").join("audit.log");
        let mut broker = BrokerProc::start_with(
            dir.path(),
            Opts {
                tls: true,
                env: vec![("BUBBLED_TEST_FAIL".into(), point.into())],
                ..Opts::default()
            },
        );
        let before = std::fs::read(&log).unwrap_or_default();
        let mut m = broker.tls_client("parent-b").await;
        let probe = bubble_proto::v1::BubbleRef {
            bubble_id: format!("b-{:032x}", 0xdead_beefu64),
        };
        // The answer may or may not come before the broker dies.
        let _ = m.describe_bubble(probe).await;
        wait_pid_gone(broker.pid() as i32, Duration::from_secs(10)).await;
        broker.kill();
        let (sec, _) = security_and_restored(&log);
        assert_eq!(
            sec,
            usize::from(point == "audit.die_after_fsync"),
            "{point}: the log before the restart"
        );
        // Cut back to before the record while the broker is down.
        std::fs::write(&log, &before).unwrap();
        let mut broker = BrokerProc::start(dir.path(), false);
        let (sec, restored) = security_and_restored(&log);
        assert_eq!((sec, restored), (1, true), "{point}: restored at start");
        let summary = bubble_audit::verify(&std::fs::read(&log).unwrap(), None).unwrap();
        assert_eq!(summary.unsigned_tail, 0, "{point}: {summary:?}");
        assert!(broker.terminate().unwrap().success());
        // Now pinned: the same cut is refused.
        std::fs::write(&log, &before).unwrap();
        let err = start_refused(dir.path());
        assert!(err.contains("truncated or replaced"), "{point}: {err}");
    }
}
