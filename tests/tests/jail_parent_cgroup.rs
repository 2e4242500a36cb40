//! A parent's cgroup is made once and kept while the broker runs (see
//! docs/jail.md): its limit still follows the configuration across a
//! restart, and it is removed once unused. In a test binary of its own:
//! the broker it restarts sweeps unclaimed hierarchies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

fn config(parent_mib: u64) -> Opts {
    Opts {
        config: Some(format!(
            "[quota]\nmax_bubbles_per_parent = 4\nmax_memory_mib_per_parent = {parent_mib}\n"
        )),
        ..Opts::default()
    }
}

/// The parent memory cgroup of VMM `pid` and its limit file.
fn parent_limit(pid: u32) -> Option<(PathBuf, PathBuf)> {
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let (ctl, mount, file) = if v1 {
        ("memory", "memory", "memory.limit_in_bytes")
    } else {
        ("", "", "memory.max")
    };
    let path = cgroup_of(pid, ctl)?;
    let dir = Path::new("/sys/fs/cgroup")
        .join(mount)
        .join(path.trim_start_matches('/'));
    let parent = dir.parent()?.to_path_buf();
    let limit = parent.join(file);
    Some((parent, limit))
}

fn read(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A broker restarted with a larger parent budget under a running bubble
/// (whose parent cgroup therefore stays, with the old limit): the first
/// create after the restart writes the new limit. Deleting every bubble
/// of the parent removes its cgroup within the sweep's period, and the
/// next create makes it again with its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parents_cgroup_limit_follows_the_config_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with(dir.path(), config(512));
    let mut c = broker.client().await;
    let first = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(first.state, READY, "{}", first.failure_reason);
    assert_eq!(first.jail_warning, "", "cgroups are writable here");
    let (parent, limit) = parent_limit(first.vmm_pid).unwrap();
    assert_eq!(read(&limit), Some((512 + 4 * 64) << 20));
    drop(c);
    broker.terminate();
    let broker = BrokerProc::start_with(dir.path(), config(1024));
    let mut c = broker.client().await;
    let b = wait_for(&mut c, &first.bubble_id, Duration::from_secs(20), |b| {
        b.state == READY
    })
    .await;
    assert_eq!(b.vmm_pid, first.vmm_pid, "re-adopted, not restarted");
    // Kept by the running bubble, with the old limit so far.
    assert_eq!(read(&limit), Some((512 + 4 * 64) << 20));
    let second = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(second.state, READY, "{}", second.failure_reason);
    assert_eq!(
        parent_limit(second.vmm_pid).unwrap().0,
        parent,
        "one parent cgroup"
    );
    assert_eq!(read(&limit), Some((1024 + 4 * 64) << 20));
    for id in [&first.bubble_id, &second.bubble_id] {
        c.delete_bubble(pb::BubbleRef {
            bubble_id: id.clone(),
        })
        .await
        .unwrap();
    }
    wait_until(
        "the unused parent cgroup to be removed",
        Duration::from_secs(15),
        || parent.exists(),
        |exists| !exists,
    )
    .await;
    let third = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(third.state, READY, "{}", third.failure_reason);
    assert_eq!(third.jail_warning, "");
    assert_eq!(parent_limit(third.vmm_pid).unwrap().0, parent);
    assert_eq!(read(&limit), Some((1024 + 4 * 64) << 20));
}
