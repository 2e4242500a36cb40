//! A jailed VMM's uid stays claimed host-wide for as long as the VMM
//! runs, even after the broker that lent it is gone (issue 12): two VMMs
//! sharing a uid share its `RLIMIT_NPROC` and may signal each other.
//!
//! The attack: broker B starts first (so the uids in use when it started
//! say nothing of what comes later), broker A lends a uid of the same
//! range to a bubble and is SIGKILLed; its VMM lives on. B must not lend
//! that uid to a VMM of its own while A's VMM runs, and may once it has
//! ended.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// Two ids, outside the default range (other tests' brokers use that).
const CONFIG: &str = "spare_vmms = 0\n[jail]\nuid_range = \"300000-300001\"\n";

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Creates a bubble; its VMM's uid, or `None` if it could not start.
async fn create(c: &mut Client) -> Option<(String, u32)> {
    match c.create_bubble(create_req(16)).await {
        Ok(r) => {
            let b = r.into_inner();
            (b.state == READY).then(|| (b.bubble_id, uid_of(b.vmm_pid)))
        }
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_brokers_vmm_keeps_its_uid_from_other_brokers() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Not root: the user-namespace path, where no uid is lent.
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("NOT RUN: not root");
        return;
    }
    let opts = Opts {
        config: Some(CONFIG.into()),
        ..Opts::default()
    };
    let dir_b = tempfile::tempdir().unwrap();
    let b = BrokerProc::start_with(dir_b.path(), opts.clone());
    let dir_a = tempfile::tempdir().unwrap();
    let mut a = BrokerProc::start_with(dir_a.path(), opts);
    let mut ca = a.client().await;
    let (_, taken) = create(&mut ca).await.expect("broker A's bubble");
    assert!((300_000..=300_001).contains(&taken));
    let survivor = vmm_pids_under(dir_a.path());
    assert_eq!(survivor.len(), 1);
    a.kill();
    // Its VMM outlives it (it waits to be re-adopted).
    assert_eq!(vmm_pids_under(dir_a.path()), survivor);

    let mut cb = b.client().await;
    let (_, first) = create(&mut cb).await.expect("broker B's first bubble");
    assert_ne!(first, taken, "B lent the uid of A's running VMM");
    // The range is exhausted for B while A's VMM runs: refused, never
    // the running VMM's uid.
    if let Some((_, second)) = create(&mut cb).await {
        panic!("B lent uid {second} a second time (A's VMM runs as {taken})");
    }

    // A's VMM gone, its uid is free again.
    kill_vmms_under(dir_a.path());
    wait_pid_gone(survivor[0], Duration::from_secs(10)).await;
    let got = wait_until(
        "the dead VMM's uid to be lent again",
        Duration::from_secs(10),
        || futures_now(create(&mut cb)),
        Option::is_some,
    )
    .await;
    assert_eq!(got.map(|(_, u)| u), Some(taken));
}

/// Runs a future to completion from a synchronous probe.
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
