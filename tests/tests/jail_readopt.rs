//! A re-adopted VMM's cgroups are removed when it exits (issue 12). In a
//! test binary of its own: the broker it restarts sweeps unclaimed
//! hierarchies, which would race `jail_cgroups`' sweep test in the same
//! process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// A re-adopted VMM's cgroups are removed when it exits, not only at the
/// broker's next start: a broker is restarted under two running bubbles;
/// one is deleted, the other's VMM is killed from outside; each one's
/// cgroups (every controller's) are gone within the deadline, and the
/// parent's cgroup goes with the last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readopted_vmms_cgroups_are_removed_when_it_exits() {
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let ctls: &[(&str, &str)] = if v1 {
        &[("memory", "memory"), ("pids", "pids"), ("cpu", "cpu")]
    } else {
        &[("", "")]
    };
    let dirs_of = |pid: u32| -> Vec<PathBuf> {
        ctls.iter()
            .map(|(ctl, mount)| {
                let path = cgroup_of(pid, ctl).expect("a cgroup");
                Path::new("/sys/fs/cgroup")
                    .join(mount)
                    .join(path.trim_start_matches('/'))
            })
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut bubbles = Vec::new();
    for _ in 0..2 {
        let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        let dirs = dirs_of(b.vmm_pid);
        for d in &dirs {
            assert!(d.to_string_lossy().contains(&b.bubble_id), "{d:?}");
            assert!(d.exists(), "{d:?}");
        }
        bubbles.push((b.bubble_id, b.vmm_pid, dirs));
    }
    drop(c);
    broker.terminate();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    for (id, pid, dirs) in &bubbles {
        let b = wait_for(&mut c, id, Duration::from_secs(20), |b| b.state == READY).await;
        assert_eq!(b.vmm_pid, *pid, "re-adopted, not restarted");
        // The new broker's start kept them: a process runs in each.
        assert!(dirs.iter().all(|d| d.exists()), "{dirs:?}");
    }
    let (deleted, killed) = (&bubbles[0], &bubbles[1]);
    c.delete_bubble(pb::BubbleRef {
        bubble_id: deleted.0.clone(),
    })
    .await
    .unwrap();
    wait_until(
        "the deleted re-adopted bubble's cgroups to be removed",
        Duration::from_secs(10),
        || deleted.2.iter().filter(|d| d.exists()).collect::<Vec<_>>(),
        Vec::is_empty,
    )
    .await;
    // The other one's VMM dies on its own (killed from outside).
    // SAFETY: signalling a VMM this test's broker runs.
    unsafe {
        libc::kill(killed.1 as i32, libc::SIGKILL);
    }
    wait_until(
        "the killed re-adopted VMM's cgroups to be removed",
        Duration::from_secs(10),
        || killed.2.iter().filter(|d| d.exists()).collect::<Vec<_>>(),
        Vec::is_empty,
    )
    .await;
    // Both bubbles had the same parent: its cgroup went with the last.
    let parent = killed.2[0].parent().unwrap().to_path_buf();
    wait_until(
        "the parent's cgroup to be removed",
        Duration::from_secs(10),
        || parent.exists(),
        |exists| !exists,
    )
    .await;
}
