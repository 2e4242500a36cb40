//! A claim on a frozen copy has a lease and fences its holder: two brokers
//! share one store (a real S3 server, moto; and a local directory) with a
//! short lease.
//!
//! - A broker SIGKILLed right after claiming a copy holds it only until
//!   the lease ends: before that the other broker is refused, after it the
//!   other broker restores the bubble, which runs exactly once.
//! - A broker SIGSTOPped after loading the copy into a new VMM (claim not
//!   committed), past its lease, loses the claim to the other broker,
//!   which restores the bubble; SIGCONTed, it cannot commit: its restore
//!   fails with FAILED_PRECONDITION, its VMM ends, and the winner's bubble
//!   keeps running.
//! - A broker SIGSTOPped mid-suspend (copy stored, suspend not recorded),
//!   long past its lease: the other broker is refused the copy the whole
//!   time (a suspend claim never expires for others); SIGCONTed, the
//!   suspender records SUSPENDED and stops its VMM, and only then does
//!   the copy restore elsewhere, once.
//! - A broker SIGKILLed there: the other broker is refused past the
//!   lease, the restarted suspender re-adopts the still running VMM (the
//!   bubble runs on, once), and its next suspend moves.
//! - A broker SIGKILLed after committing its restore claim, before
//!   recording READY: its registry (SUSPENDED) decides. Restarted, it
//!   stops the VMM it never recorded and gives the committed claim back;
//!   the copy then restores once (on the other broker here), not stuck.
//! - A suspender whose claim is rewritten under it (another broker that
//!   broke the rules) does not record SUSPENDED: its bubble is FAILED with
//!   its VMM stopped, and the stored copy restores elsewhere once the
//!   rewritten claim's lease ends (fails cleanly, not lost).
//!
//! The steps are reached through the fault points of the
//! `fault-injection` feature (`BUBBLED_TEST_PAUSE`).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::moto::{http, s3_env, start_moto, Moto};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use tonic::Code;

const READY: i32 = pb::BubbleState::Ready as i32;
const KEK: [u8; 32] = [0x3c; 32];
const LEASE_MS: u64 = 3000;

/// Where the two brokers keep frozen copies.
enum Store {
    Local(tempfile::TempDir),
    S3 { _moto: Moto, port: u16 },
}

impl Store {
    fn local() -> Self {
        Store::Local(tempfile::tempdir().unwrap())
    }

    /// A moto server with one bucket; `None` (after reporting the missing
    /// dependency) if moto cannot start.
    fn s3() -> Option<Self> {
        let (moto, port) = match start_moto() {
            Ok(m) => m,
            Err(e) => {
                missing_dependency(&format!("no S3-compatible server: {e}"));
                return None;
            }
        };
        let created = http(port, "PUT", "/leases").unwrap_or_default();
        assert!(created.starts_with("HTTP/1.1 200"), "{created}");
        Some(Store::S3 { _moto: moto, port })
    }

    /// Broker options: this store, a short lease, and `pause` if given.
    fn opts(&self, pause: Option<&str>) -> Opts {
        let mut o = match self {
            Store::Local(d) => shared_store(d.path()),
            Store::S3 { port, .. } => Opts {
                args: vec![
                    "--store".into(),
                    format!("s3://leases/shared?endpoint=http://127.0.0.1:{port}"),
                ],
                env: s3_env(),
                ..Default::default()
            },
        };
        o.config = Some(format!("claim_lease_ms = {LEASE_MS}\n"));
        if let Some(p) = pause {
            o.env.push(("BUBBLED_TEST_PAUSE".into(), p.into()));
        }
        o
    }
}

/// The first log line of the broker on `dir` that contains every one of
/// `words`; waits for it (fails the test after 30 s).
async fn log_line(dir: &Path, words: &[&str]) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(Instant::now() < until, "the broker never logged {words:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bubble on `c` holding state, suspended under the parent's key.
async fn suspended_bubble(c: &mut Client) -> (String, u64, Vec<u8>) {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let id = b.bubble_id;
    let keys = c.call(call_req(&id, "keys", b"")).await.unwrap();
    let s = c.suspend_bubble(suspend_req(&id, &KEK)).await.unwrap();
    (id, s.into_inner().generation, keys.into_inner().output)
}

/// Restores on `c` until it succeeds (each refusal must be the claim's
/// FAILED_PRECONDITION); fails the test after `limit`. Returns how many
/// attempts were refused.
async fn restore_when_free(c: &mut Client, id: &str, generation: u64, limit: Duration) -> usize {
    let until = Instant::now() + limit;
    let mut refused = 0;
    loop {
        match c.restore_bubble(restore_req(id, &KEK, generation)).await {
            Ok(b) => {
                assert_eq!(b.into_inner().state, READY);
                return refused;
            }
            Err(st) => {
                assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
                refused += 1;
            }
        }
        assert!(Instant::now() < until, "the claim never became free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bubble runs on `c` in a live VMM with the keys it was suspended
/// with; returns that VMM's pid (as the API reports it).
async fn runs_once(c: &mut Client, id: &str, keys: &[u8]) -> u32 {
    let b = describe(c, id).await;
    assert_eq!(b.state, READY);
    assert!(b.vmm_pid > 0);
    assert!(Path::new(&format!("/proc/{}", b.vmm_pid)).exists());
    let now = c.call(call_req(id, "keys", b"")).await.unwrap();
    assert_eq!(
        now.into_inner().output,
        keys,
        "the same bubble, not a new one"
    );
    b.vmm_pid
}

async fn killed_claimant(store: Store) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = BrokerProc::start_with(da.path(), store.opts(Some("restore.claimed=60000")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (ca, mut cb) = (a.client().await, b.client().await);
    let (id, generation, keys) = suspended_bubble(&mut cb).await;
    // A imports the copy, claims it, and dies holding the claim.
    let mut ca2 = ca.clone();
    let (rid, g) = (id.clone(), generation);
    let restore = tokio::spawn(async move { ca2.restore_bubble(restore_req(&rid, &KEK, g)).await });
    log_line(da.path(), &["fault point reached", "restore.claimed"]).await;
    let claimed_at = Instant::now();
    a.kill();
    assert!(restore.await.unwrap().is_err(), "A died mid-restore");
    // B's own restore is refused while A's lease runs, then wins.
    let refused = restore_when_free(&mut cb, &id, 0, Duration::from_secs(30)).await;
    let waited = claimed_at.elapsed();
    assert!(refused > 0, "the claim held for its lease");
    assert!(
        waited >= Duration::from_millis(LEASE_MS / 2),
        "taken over after {waited:?}, before the lease ended"
    );
    runs_once(&mut cb, &id, &keys).await;
    drop(a);
}

async fn stopped_claimant(store: Store) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), store.opts(Some("restore.loaded=2000")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (id, generation, keys) = suspended_bubble(&mut cb).await;
    let mut ca2 = ca.clone();
    let (rid, g) = (id.clone(), generation);
    let restore = tokio::spawn(async move { ca2.restore_bubble(restore_req(&rid, &KEK, g)).await });
    // A has the copy in a new VMM and is about to commit: stop it there.
    let line = log_line(da.path(), &["fault point at a VMM", "restore.loaded"]).await;
    let a_vmm: i32 = line
        .split("vmm_pid=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vmm_pid in {line:?}"));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
    // While A's lease runs B is refused; then B takes the claim over.
    let refused = restore_when_free(&mut cb, &id, 0, Duration::from_secs(30)).await;
    assert!(refused > 0, "the claim held for its lease");
    let winner = runs_once(&mut cb, &id, &keys).await;
    // SAFETY: as above.
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    // A wakes at its commit (its 2 s pause ran out while it was stopped):
    // fenced, its restore fails and its VMM ends.
    let st = tokio::time::timeout(Duration::from_secs(30), restore)
        .await
        .expect("A answers")
        .unwrap()
        .expect_err("a fenced claimant cannot restore");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("claim"), "{st:?}");
    wait_pid_gone(a_vmm, Duration::from_secs(10)).await;
    // A forgot the import; B's bubble runs on, the same VMM.
    let gone = ca
        .describe_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .expect_err("A keeps no record");
    assert_eq!(gone.code(), Code::PermissionDenied);
    assert_eq!(runs_once(&mut cb, &id, &keys).await, winner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_claimant_loses_the_copy_after_its_lease_s3() {
    if let Some(s) = Store::s3() {
        killed_claimant(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_claimant_cannot_commit_after_a_takeover_s3() {
    if let Some(s) = Store::s3() {
        stopped_claimant(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_claimant_cannot_commit_after_a_takeover_local() {
    stopped_claimant(Store::local()).await;
}

/// The VMM pid of `id` on `c` (READY).
async fn vmm_of(c: &mut Client, id: &str) -> i32 {
    let b = describe(c, id).await;
    assert_eq!(b.state, READY);
    b.vmm_pid as i32
}

/// Every restore of `id` on `c` for `span`, and at least four, is refused
/// with the claim's FAILED_PRECONDITION (the copy is not this broker's to
/// take). The count is a floor, not a rate: on a loaded host one refusal
/// can take longer than the whole span.
async fn refused_throughout(c: &mut Client, id: &str, generation: u64, span: Duration) {
    let until = Instant::now() + span;
    let mut tries = 0;
    while tries < 4 || Instant::now() < until {
        match c.restore_bubble(restore_req(id, &KEK, generation)).await {
            Ok(_) => panic!("restored a copy whose suspend was never recorded (try {tries})"),
            Err(st) => assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}"),
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bubble on `c` holding state; its keys.
async fn running_bubble(c: &mut Client) -> (String, Vec<u8>) {
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let keys = c.call(call_req(&b.bubble_id, "keys", b"")).await.unwrap();
    (b.bubble_id, keys.into_inner().output)
}

async fn stopped_suspender(store: Store) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), store.opts(Some("suspend.stored=1500")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (id, keys) = running_bubble(&mut ca).await;
    let a_vmm = vmm_of(&mut ca, &id).await;
    let mut ca2 = ca.clone();
    let sid = id.clone();
    let suspend = tokio::spawn(async move { ca2.suspend_bubble(suspend_req(&sid, &KEK)).await });
    // A stored generation 1 and is about to record it: stop it there.
    log_line(da.path(), &["fault point reached", "suspend.stored"]).await;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
    // Its lease runs out twice over: B is refused the copy all along.
    refused_throughout(&mut cb, &id, 1, Duration::from_millis(2 * LEASE_MS)).await;
    // SAFETY: as above.
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    let s = tokio::time::timeout(Duration::from_secs(30), suspend)
        .await
        .expect("A answers")
        .unwrap()
        .expect("A's claim still fences its own suspend in");
    assert_eq!(s.into_inner().generation, 1);
    wait_pid_gone(a_vmm, Duration::from_secs(10)).await;
    // Now the copy is the bubble: B restores it, once.
    let r = cb.restore_bubble(restore_req(&id, &KEK, 1)).await.unwrap();
    assert_eq!(r.into_inner().state, READY);
    runs_once(&mut cb, &id, &keys).await;
    let again = ca.restore_bubble(restore_req(&id, &KEK, 0)).await;
    assert!(again.is_err(), "A restored the copy B runs: {again:?}");
}

async fn killed_suspender(store: Store) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = BrokerProc::start_with(da.path(), store.opts(Some("suspend.stored=60000")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (id, keys) = running_bubble(&mut ca).await;
    let a_vmm = vmm_of(&mut ca, &id).await;
    let mut ca2 = ca.clone();
    let sid = id.clone();
    let suspend = tokio::spawn(async move { ca2.suspend_bubble(suspend_req(&sid, &KEK)).await });
    log_line(da.path(), &["fault point reached", "suspend.stored"]).await;
    a.kill();
    assert!(suspend.await.unwrap().is_err(), "A died mid-suspend");
    // The stored copy is not the bubble (A's VMM still holds it): refused
    // to B long past A's lease.
    refused_throughout(&mut cb, &id, 1, Duration::from_millis(2 * LEASE_MS)).await;
    // A restarted runs the bubble on in the same VMM; B is still refused.
    let a = BrokerProc::start_with(da.path(), store.opts(None));
    let mut ca = a.client().await;
    assert_eq!(runs_once(&mut ca, &id, &keys).await as i32, a_vmm);
    refused_throughout(&mut cb, &id, 1, Duration::from_millis(500)).await;
    // Its next suspend (generation 1 again) replaces the leftover copy and
    // moves: B restores it once, A's VMM ends.
    let s = ca.suspend_bubble(suspend_req(&id, &KEK)).await.unwrap();
    assert_eq!(s.into_inner().generation, 1);
    wait_pid_gone(a_vmm, Duration::from_secs(10)).await;
    let r = cb.restore_bubble(restore_req(&id, &KEK, 1)).await.unwrap();
    assert_eq!(r.into_inner().state, READY);
    runs_once(&mut cb, &id, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_suspender_keeps_its_copy_past_the_lease_s3() {
    if let Some(s) = Store::s3() {
        stopped_suspender(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_suspender_keeps_its_copy_past_the_lease_local() {
    stopped_suspender(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspender_killed_before_recording_runs_the_bubble_on_s3() {
    if let Some(s) = Store::s3() {
        killed_suspender(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspend_whose_claim_is_rewritten_fails_cleanly_local() {
    let store = Store::local();
    let Store::Local(root) = &store else {
        unreachable!()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = BrokerProc::start_with(da.path(), store.opts(Some("suspend.stored=2000")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (id, keys) = running_bubble(&mut ca).await;
    let a_vmm = vmm_of(&mut ca, &id).await;
    let mut ca2 = ca.clone();
    let sid = id.clone();
    let suspend = tokio::spawn(async move { ca2.suspend_bubble(suspend_req(&sid, &KEK)).await });
    log_line(da.path(), &["fault point reached", "suspend.stored"]).await;
    // Another broker takes the claim over by writing it outright (as a
    // restore claim with a lease), while A waits to record the suspend.
    let claim = root.path().join(format!("frozen/{id}/g1/claim"));
    assert!(claim.exists(), "no claim at {}", claim.display());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let forged = format!(
        r#"{{"broker":"intruder","at_ms":{now_ms},"token":99,"seq":99,"expires_ms":{},"state":"held","purpose":"restore"}}"#,
        now_ms + LEASE_MS
    );
    std::fs::write(&claim, forged).unwrap();
    // A must not record SUSPENDED over it, nor run on beside it.
    let st = tokio::time::timeout(Duration::from_secs(30), suspend)
        .await
        .expect("A answers")
        .unwrap()
        .expect_err("a suspend whose claim was taken over cannot commit");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("claim"), "{st:?}");
    wait_pid_gone(a_vmm, Duration::from_secs(10)).await;
    let failed = describe(&mut ca, &id).await;
    assert_eq!(failed.state, pb::BubbleState::Failed as i32, "{failed:?}");
    // Not lost: once the intruder's lease ends, B restores the stored copy
    // (the bubble as it was), once.
    restore_when_free(&mut cb, &id, 1, Duration::from_secs(30)).await;
    runs_once(&mut cb, &id, &keys).await;
}

async fn killed_after_committing_a_restore(store: Store) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = BrokerProc::start_with(da.path(), store.opts(Some("restore.committed=60000")));
    let b = BrokerProc::start_with(db.path(), store.opts(None));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (id, keys) = running_bubble(&mut ca).await;
    let s = ca.suspend_bubble(suspend_req(&id, &KEK)).await.unwrap();
    assert_eq!(s.into_inner().generation, 1);
    let mut ca2 = ca.clone();
    let rid = id.clone();
    let restore = tokio::spawn(async move { ca2.restore_bubble(restore_req(&rid, &KEK, 0)).await });
    log_line(da.path(), &["fault point reached", "restore.committed"]).await;
    a.kill();
    assert!(restore.await.unwrap().is_err(), "A died mid-restore");
    // The claim is committed: nobody may take it while A is down.
    refused_throughout(&mut cb, &id, 1, Duration::from_millis(500)).await;
    let a = BrokerProc::start_with(da.path(), store.opts(None));
    let mut ca = a.client().await;
    let rec = describe(&mut ca, &id).await;
    assert_eq!(rec.state, pb::BubbleState::Suspended as i32, "{rec:?}");
    // A stopped the VMM it loaded but never recorded, then gave the claim
    // back: B restores the bubble, which runs exactly once.
    wait_bubble_vmms(da.path(), 0, Duration::from_secs(10)).await;
    restore_when_free(&mut cb, &id, 1, Duration::from_secs(30)).await;
    runs_once(&mut cb, &id, &keys).await;
    assert!(ca.restore_bubble(restore_req(&id, &KEK, 0)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restorer_killed_after_committing_gives_the_copy_back_local() {
    killed_after_committing_a_restore(Store::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restorer_killed_after_committing_gives_the_copy_back_s3() {
    if let Some(s) = Store::s3() {
        killed_after_committing_a_restore(s).await;
    }
}
