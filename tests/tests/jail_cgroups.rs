//! A bubble's VMM in its own cgroups (issue 12): limits, nesting under its
//! parent's, every thread inside (pids, cpu), its memory charged there
//! from the start, no cgroup file left open in the VMM, removal after
//! delete. See docs/jail.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// A bubble's VMM runs in a cgroup of its own, nested in its parent's:
/// memory limited to guest memory + 64 MiB, at most 16
/// tasks, the default CPU weight. Where cgroups can be written (v1 here;
/// v2 where it has controllers) and no warning is shown; the cgroup is
/// removed once the VMM is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bubble_is_limited_by_its_own_cgroup_under_its_parents() {
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    // From spares (the create path): they move themselves in.
    wait_spares_ready(dir.path(), 2, Duration::from_secs(30)).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert_eq!(b.jail_warning, "", "cgroups are writable here");
        ids.push(b);
    }
    if !v1 {
        // A v2-only host: the unified hierarchy.
        let path = cgroup_of(ids[0].vmm_pid, "").unwrap();
        let base = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let max = std::fs::read_to_string(base.join("memory.max")).unwrap();
        assert_eq!(max.trim(), ((16u64 << 20) + (64 << 20)).to_string());
        return;
    }
    let mut dirs = Vec::new();
    for b in &ids {
        let path = cgroup_of(b.vmm_pid, "memory").expect("memory cgroup");
        // One cgroup per VMM, named after its bubble.
        assert!(path.contains(&format!("/{}.v", b.bubble_id)), "{path}");
        let mem = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let read = |p: &Path, f: &str| -> u64 {
            std::fs::read_to_string(p.join(f))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(read(&mem, "memory.limit_in_bytes"), (16 << 20) + (64 << 20));
        // The VMM was in before it built its VM: the pages its guest
        // touched to boot (page tables, stacks, mailbox: ~0.5 MiB) are
        // charged here. (When the broker moved a spare in from outside,
        // pages touched before the move stayed charged elsewhere and a
        // fresh bubble could show 0 bytes.) 252 KiB was seen once, so
        // the floor is half of what a boot usually charges.
        let used = read(&mem, "memory.usage_in_bytes");
        assert!(used >= 128 << 10, "{} bytes charged to {mem:?}", used);
        // Every thread is in the bubble's pids and cpu cgroups (the
        // memory one charges by process).
        let pids_path = cgroup_of(b.vmm_pid, "pids").expect("pids cgroup");
        let cpu_path = cgroup_of(b.vmm_pid, "cpu").expect("cpu cgroup");
        assert!(
            cpu_path.contains(&format!("/{}.v", b.bubble_id)),
            "{cpu_path}"
        );
        let pid = b.vmm_pid;
        wait_until(
            "every VMM thread in its bubble's pids and cpu cgroups",
            Duration::from_secs(10),
            || outside_threads(pid, &pids_path, &cpu_path),
            Vec::is_empty,
        )
        .await;
        // The cgroup files it moved itself in with are closed (whoever
        // holds one could move any process).
        let open = cgroup_fds(pid);
        assert!(open.is_empty(), "VMM {pid} holds {open:?}");
        // Nested in its parent's, which is limited too.
        let parent = mem.parent().unwrap();
        assert!(read(parent, "memory.limit_in_bytes") < u64::MAX / 2);
        let pids = cgroup_of(b.vmm_pid, "pids").expect("pids cgroup");
        let pids = Path::new("/sys/fs/cgroup/pids").join(pids.trim_start_matches('/'));
        assert_eq!(read(&pids, "pids.max"), 16);
        dirs.push(mem);
    }
    // Both bubbles have the same parent: one parent cgroup, two children.
    assert_eq!(dirs[0].parent(), dirs[1].parent());
    assert_ne!(dirs[0], dirs[1]);
    c.delete_bubble(pb::BubbleRef {
        bubble_id: ids[0].bubble_id.clone(),
    })
    .await
    .unwrap();
    wait_until(
        "the deleted bubble's cgroup to be removed",
        Duration::from_secs(10),
        || dirs[0].exists(),
        |exists| !exists,
    )
    .await;
}

/// Threads of `pid` outside the `pids` or `cpu` cgroup given, with where
/// they are.
fn outside_threads(pid: u32, pids: &str, cpu: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let tid = t.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(t.path().join("cgroup")) else {
            continue; // exited meanwhile
        };
        let line = |ctl: &str| {
            text.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
                ctls.split(',').any(|c| c == ctl).then(|| path.to_string())
            })
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if line("pids").as_deref() != Some(pids) || line("cpu").as_deref() != Some(cpu) {
            out.push(format!(
                "{tid} ({}): {:?} {:?}",
                comm.trim(),
                line("pids"),
                line("cpu")
            ));
        }
    }
    out
}

/// Descriptors of `pid` open on a cgroup file system.
fn cgroup_fds(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .collect()
}

/// The cgroups of a killed broker whose VMMs are gone too are removed by
/// the next broker of the host to start, and a running broker's are not
/// touched (each broker claims its hierarchy while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_brokers_cgroups_are_swept_and_a_live_ones_kept() {
    let Some(root) = ["memory", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c))
        .find(|r| r.join("cgroup.procs").exists())
    else {
        panic!("no cgroup hierarchy mounted");
    };
    let ctl = if root.ends_with("memory") {
        "memory"
    } else {
        ""
    };
    let hierarchy_of = |pid: u32| -> PathBuf {
        let path = cgroup_of(pid, ctl).expect("a memory cgroup");
        let top = path.trim_start_matches('/').split('/').next().unwrap();
        assert!(top.starts_with("bubbled-"), "{path}");
        root.join(top)
    };
    let (dir_dead, dir_live) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut dead = BrokerProc::start(dir_dead.path(), false);
    let live = BrokerProc::start(dir_live.path(), false);
    let (mut cd, mut cl) = (dead.client().await, live.client().await);
    let bd = cd.create_bubble(create_req(16)).await.unwrap().into_inner();
    let bl = cl.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!((bd.state, bl.state), (READY, READY));
    let (h_dead, h_live) = (hierarchy_of(bd.vmm_pid), hierarchy_of(bl.vmm_pid));
    let live_cg = root.join(cgroup_of(bl.vmm_pid, ctl).unwrap().trim_start_matches('/'));
    dead.kill();
    kill_vmms_under(dir_dead.path());
    wait_pid_gone(bd.vmm_pid as i32, Duration::from_secs(10)).await;
    // Nobody removed it: its broker is gone.
    assert!(h_dead.exists());

    // An empty cgroup in the live broker's hierarchy (as one is between
    // its creation and its VMM's arrival): only the claim protects it.
    let probe = h_live.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe).unwrap();

    let dir_next = tempfile::tempdir().unwrap();
    let _next = BrokerProc::start(dir_next.path(), false);
    wait_until(
        "the killed broker's cgroups to be swept",
        Duration::from_secs(60),
        || h_dead.exists(),
        |exists| !exists,
    )
    .await;
    let log = dir_next.path().join("broker.log");
    wait_until(
        "the new broker's sweep to finish",
        Duration::from_secs(60),
        || std::fs::read_to_string(&log).unwrap_or_default(),
        |text| text.contains("cgroup sweep done"),
    )
    .await;
    let probe_kept = probe.exists();
    let _ = std::fs::remove_dir(&probe);
    assert!(probe_kept, "a live broker's empty cgroup was swept");
    assert!(
        h_live.exists() && live_cg.exists(),
        "a live broker's cgroup went"
    );
    let out = cl
        .call(call_req(&bl.bubble_id, "echo", b"still here"))
        .await
        .unwrap()
        .into_inner()
        .output;
    assert_eq!(out, b"still here");
}
