//! A restarted broker kills, by their cgroups, the VMMs it cannot reach
//! (issue 12). In a test binary of its own: the broker it restarts sweeps
//! unclaimed hierarchies.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const KEK: [u8; 32] = [0x4d; 32];

/// The cgroup directories of process `pid`, one per controller (v1), or
/// its unified one.
fn cgroup_dirs(pid: u32) -> Vec<PathBuf> {
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let ctls: &[(&str, &str)] = if v1 {
        &[("memory", "memory"), ("pids", "pids"), ("cpu", "cpu")]
    } else {
        &[("", "")]
    };
    ctls.iter()
        .map(|(ctl, mount)| {
            let path = cgroup_of(pid, ctl).expect("a cgroup");
            Path::new("/sys/fs/cgroup")
                .join(mount)
                .join(path.trim_start_matches('/'))
        })
        .collect()
}

/// A broker killed after it loaded a restore into a new VMM and before it
/// recorded anything of it leaves that VMM running; with its socket
/// made unreachable, the restarted broker cannot stop it through the
/// socket. It kills it by its cgroup: the process is gone and its
/// cgroups are removed within the deadline. A bubble the restarted broker
/// re-adopts keeps its VMM (same pid), its cgroups, and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_kills_the_vmms_it_cannot_reach_by_their_cgroups() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: vec![("BUBBLED_TEST_PAUSE".into(), "restore.loaded=60000".into())],
            ..Opts::default()
        },
    );
    let mut c = a.client().await;
    let kept = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(kept.state, READY, "{}", kept.failure_reason);
    let kept_dirs = cgroup_dirs(kept.vmm_pid);
    let keys = c
        .call(call_req(&kept.bubble_id, "keys", b""))
        .await
        .unwrap()
        .into_inner()
        .output;

    let lost = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let s = c
        .suspend_bubble(suspend_req(&lost.bubble_id, &KEK))
        .await
        .unwrap()
        .into_inner();
    let mut c2 = c.clone();
    let (rid, g) = (lost.bubble_id.clone(), s.generation);
    let restore = tokio::spawn(async move { c2.restore_bubble(restore_req(&rid, &KEK, g)).await });
    // The copy is in a new VMM, nothing of it recorded: kill the broker.
    let line =
        bubble_e2e_tests::awaits::log_line(dir.path(), &["fault point at a VMM", "restore.loaded"])
            .await;
    let stray: u32 = line
        .split("vmm_pid=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vmm_pid in {line:?}"));
    let stray_dirs = cgroup_dirs(stray);
    for d in &stray_dirs {
        assert!(d.to_string_lossy().contains(&lost.bubble_id), "{d:?}");
    }
    a.kill();
    assert!(
        restore.await.unwrap().is_err(),
        "the broker died mid-restore"
    );
    drop(c);
    // Its socket unreachable: no restarted broker can stop it through it.
    let sock = dir
        .path()
        .join("bubbles")
        .join(&lost.bubble_id)
        .join("vmm.sock");
    std::fs::remove_file(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert!(
        Path::new(&format!("/proc/{stray}")).exists(),
        "the stray VMM outlived its broker"
    );

    let b = BrokerProc::start(dir.path(), false);
    wait_pid_gone(stray as i32, Duration::from_secs(20)).await;
    wait_until(
        "the stray VMM's cgroups to be removed",
        Duration::from_secs(10),
        || stray_dirs.iter().filter(|d| d.exists()).collect::<Vec<_>>(),
        Vec::is_empty,
    )
    .await;

    // The re-adopted one: untouched.
    let mut c = b.client().await;
    let d = wait_for(&mut c, &kept.bubble_id, Duration::from_secs(20), |b| {
        b.state == READY
    })
    .await;
    assert_eq!(d.vmm_pid, kept.vmm_pid, "re-adopted, not restarted");
    assert!(kept_dirs.iter().all(|d| d.exists()), "{kept_dirs:?}");
    let again = c
        .call(call_req(&kept.bubble_id, "keys", b""))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(again, keys, "the same bubble answers");
    assert!(
        std::fs::read_to_string(dir.path().join("broker.log"))
            .unwrap()
            .contains("killed a VMM no bubble of this broker owns"),
        "the kill is logged"
    );
}
