//! The VMM jail, checked from outside on real KVM: what `/proc` shows of a
//! bubble's VMM (from a spare, from a fresh start, after restore), a
//! forbidden system call failing its bubble with reason `seccomp`, and
//! VMMs dying with a broker started with `die_with_broker`.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// Environment a broker runs with that no VMM may inherit.
fn secret_env() -> Vec<(String, String)> {
    vec![
        ("AWS_SECRET_ACCESS_KEY".into(), "not-for-vmms".into()),
        ("BUBBLED_TEST_SECRET".into(), "not-for-vmms".into()),
    ]
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The namespaces a VMM must not share with the broker (this test's, as
/// the broker runs in the test's namespaces).
const OWN_NAMESPACES: [&str; 5] = ["mnt", "pid", "net", "ipc", "uts"];

/// What the namespaces, root and identity of the jail promise, seen from
/// `/proc`: another uid than the broker's, other namespaces, an empty
/// root of its own, and no way to the broker's key.
fn assert_confined(pid: u32, data_dir: &Path) -> u32 {
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid, me, "VMM {pid} runs as the broker's uid");
    for ns in OWN_NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, mine, "VMM {pid} shares the {ns} namespace");
    }
    // Its root: not ours, and empty (no /dev, no /proc, no data dir).
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let ours = std::fs::metadata("/").unwrap();
    assert!((root.dev(), root.ino()) != (ours.dev(), ours.ino()));
    let inside: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(inside.is_empty(), "VMM {pid}'s root holds {inside:?}");
    // In its pid namespace it is pid 1: it can name no other process.
    assert!(status_field(pid, "NSpid").ends_with("\t1"));
    // Even given the path, its uid may not open the broker's key.
    let kek = data_dir.join("kek");
    assert!(kek.exists());
    use std::os::unix::process::CommandExt;
    let opened = std::process::Command::new("cat")
        .arg(&kek)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!opened.success(), "uid {uid} can read {}", kek.display());
    uid
}

/// Everything the jail's first layer promises, seen from `/proc`.
fn assert_hardened(pid: u32, data_dir: &Path) {
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "pid {pid}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set} of {pid}");
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("AWS_") && !environ.contains("BUBBLED_"),
        "VMM {pid} inherited: {environ:?}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let row = |name: &str| -> Vec<String> {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} limit"))[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("Max core file size"), ["0", "0"]);
    assert_eq!(row("Max open files"), ["64", "64"]);
    // No descriptor but its own: nothing of the broker's data directory
    // except the bubble's own runtime files.
    let bubbles = data_dir.join("bubbles");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.starts_with(data_dir) {
            assert!(
                target.starts_with(&bubbles),
                "VMM {pid} holds {}",
                target.display()
            );
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert!(comm.starts_with("vmm:"), "{comm:?}");
    // A seccomp filter on every thread, not only the vCPU's.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        assert!(
            st.is_empty() || st.contains("Seccomp:\t2"),
            "thread {:?} of {pid} has no filter",
            t.file_name()
        );
    }
    assert_confined(pid, data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_are_hardened_from_spares_fresh_starts_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: secret_env(),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(20)).await;
    'spares: for pid in spare_pids_under(dir.path()) {
        // A spare names itself first thing after exec: wait for that.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "vmm:spare" {
                break;
            }
            // A spare's jail waiter caught in the moment after its fork,
            // before it named itself or its child could be read: not a
            // spare (the waiter is checked below, with the VMMs).
            if comm.trim() == "vmm:jail" {
                continue 'spares;
            }
            assert!(Instant::now() < until, "spare {pid} is named {comm:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(status_field(pid as u32, "NoNewPrivs"), "1");
    }
    // From a spare.
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    assert_hardened(b.vmm_pid, dir.path());
    let r = c.call(call_req(&b.bubble_id, "echo", b"x")).await.unwrap();
    assert_eq!(r.into_inner().output, b"x");

    // After suspend and restore.
    let id = b.bubble_id.clone();
    c.suspend_bubble(pb::SuspendBubbleRequest {
        bubble_id: id.clone(),
        kek: Vec::new(),
    })
    .await
    .unwrap();
    let r = c
        .restore_bubble(pb::RestoreBubbleRequest {
            bubble_id: id.clone(),
            kek: Vec::new(),
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY, "{}", r.failure_reason);
    assert_ne!(r.vmm_pid, b.vmm_pid);
    assert_hardened(r.vmm_pid, dir.path());
    let out = c.call(call_req(&id, "echo", b"y")).await.unwrap();
    assert_eq!(out.into_inner().output, b"y");

    // A fresh start (no spares on this broker).
    let dir2 = tempfile::tempdir().unwrap();
    let fresh = BrokerProc::start_with(
        dir2.path(),
        Opts {
            env: secret_env(),
            config: Some("spare_vmms = 0\n".into()),
            ..Opts::default()
        },
    );
    let mut c2 = fresh.client().await;
    let b2 = c2.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b2.state, READY, "{}", b2.failure_reason);
    assert!(spare_pids_under(dir2.path()).is_empty());
    assert_hardened(b2.vmm_pid, dir2.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_and_spares_die_with_a_killed_broker_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("[jail]\ndie_with_broker = true\n".into()),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    wait_spares_ready(dir.path(), 2, Duration::from_secs(20)).await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    let vmm = b.vmm_pid as i32;
    // Taking a spare starts another one: the broker dies while it starts.
    broker.kill();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i32> = vmm_pids_under(dir.path())
            .into_iter()
            .chain(spare_pids_under(dir.path()))
            .collect();
        // A zombie (not yet reaped by its new parent) is dead.
        let alive = std::fs::read_to_string(format!("/proc/{vmm}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        });
        if left.is_empty() && !alive {
            break;
        }
        assert!(
            Instant::now() < until,
            "VMMs outlived their broker: {left:?} (bubble's VMM alive: {alive})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_syscall_fails_only_its_bubble_with_reason_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let victim = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let other = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(victim.state, READY, "{}", victim.failure_reason);
    assert_eq!(other.state, READY, "{}", other.failure_reason);
    for b in [&victim, &other] {
        assert_hardened(b.vmm_pid, dir.path());
    }
    // The escape attempt: the VMM's vCPU thread opens a file.
    let op = bubble_vmm::jail::seccomp::FAULT_OP;
    let e = c
        .call(call_req(&victim.bubble_id, op, b""))
        .await
        .unwrap_err();
    assert!(e.message().contains("seccomp"), "{e:?}");
    let b = wait_for(&mut c, &victim.bubble_id, Duration::from_secs(10), |b| {
        b.state == pb::BubbleState::Failed as i32
    })
    .await;
    assert_eq!(b.state, pb::BubbleState::Failed as i32);
    assert!(b.failure_reason.contains("seccomp"), "{}", b.failure_reason);
    // Everyone else keeps answering.
    let r = c
        .call(call_req(&other.bubble_id, "echo", b"still here"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().output, b"still here");
    let mut c2 = broker.client().await;
    let fresh = c2.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(fresh.state, READY, "{}", fresh.failure_reason);
}

/// Two live VMMs never share a uid, and a VMM keeps its jail (and is
/// re-adopted by its uid) across a broker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_have_a_uid_each_and_are_readopted_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let mut uids = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert!(uids.insert(assert_confined(b.vmm_pid, dir.path())));
        ids.push((b.bubble_id, b.vmm_pid));
    }
    // Idle spares hold uids of their own too, once jailed (a spare names
    // itself `vmm:spare` after its jail; before that it is one process,
    // not yet forked into its namespace).
    wait_spares_ready(dir.path(), 2, Duration::from_secs(20)).await;
    let spares = wait_until(
        "two jailed spares",
        Duration::from_secs(20),
        || {
            spare_pids_under(dir.path())
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "vmm:spare")
                })
                .collect::<Vec<_>>()
        },
        |s| s.len() >= 2,
    )
    .await;
    for pid in spares {
        assert!(uids.insert(assert_confined(pid as u32, dir.path())));
    }
    drop(c);
    broker.terminate();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    for (id, pid) in &ids {
        let b = wait_for(&mut c, id, Duration::from_secs(20), |b| b.state == READY).await;
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert_eq!(b.vmm_pid, *pid, "re-adopted, not restarted");
        let r = c.call(call_req(id, "echo", b"again")).await.unwrap();
        assert_eq!(r.into_inner().output, b"again");
    }
    // New VMMs of the restarted broker take none of the re-adopted uids.
    let fresh = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(fresh.state, READY, "{}", fresh.failure_reason);
    let uid = assert_confined(fresh.vmm_pid, dir.path());
    for (_, pid) in &ids {
        assert_ne!(assert_confined(*pid, dir.path()), uid);
    }
}

/// The unprivileged path (a user namespace mapping one id), as a broker
/// that is not root takes it: forced here with `[jail] userns = true`, so
/// the VMM first drops to an id of the range (a non-root process from
/// then on, as an unprivileged broker's VMM is) and makes its user
/// namespace itself. Spares, fresh starts, calls, the seccomp kill and
/// suspend/restore all work on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_namespace_path_jails_as_well() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            env: secret_env(),
            config: Some("[jail]\nuserns = true\n".into()),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    assert_hardened(b.vmm_pid, dir.path());
    let theirs = std::fs::read_link(format!("/proc/{}/ns/user", b.vmm_pid)).unwrap();
    let mine = std::fs::read_link("/proc/self/ns/user").unwrap();
    assert_ne!(theirs, mine, "no user namespace of its own");
    // One id mapped: root inside is the VMM's own uid outside.
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", b.vmm_pid)).unwrap();
    let map: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(map.len(), 3, "{map:?}");
    assert_eq!(map[2], "1");
    let r = c.call(call_req(&b.bubble_id, "echo", b"x")).await.unwrap();
    assert_eq!(r.into_inner().output, b"x");
    suspend_and_restore(&mut c, &b.bubble_id).await;
    let r = describe(&mut c, &b.bubble_id).await;
    assert_eq!(r.state, READY, "{}", r.failure_reason);
    assert_hardened(r.vmm_pid, dir.path());
    let out = c.call(call_req(&b.bubble_id, "echo", b"y")).await.unwrap();
    assert_eq!(out.into_inner().output, b"y");
    let op = bubble_vmm::jail::seccomp::FAULT_OP;
    let e = c.call(call_req(&b.bubble_id, op, b"")).await.unwrap_err();
    assert!(e.message().contains("seccomp"), "{e:?}");
}

/// Nothing of the broker's is readable by another uid (such as a VMM's):
/// the data directory is 0711 (parents pass through it to the API
/// socket), every directory under it 0700 and every file 0600 (registry,
/// keys, logs, frozen chunks), including files an older broker left with
/// looser modes; sockets keep their own (API 0666, VMMs' 0600).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // Left by an older broker.
    std::fs::create_dir_all(dir.path().join("store/old")).unwrap();
    std::fs::write(dir.path().join("store/old/chunk"), b"x").unwrap();
    for p in ["store", "store/old", "store/old/chunk"] {
        let p = dir.path().join(p);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    // Frozen chunks and the registry entry of a suspended bubble.
    let s = c
        .suspend_bubble(suspend_req(&b.bubble_id, b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::BubbleState::Suspended as i32);
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(dir.path()), 0o711);
    let mut seen = 0;
    let mut todo = vec![dir.path().to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                todo.push(p);
            } else if ft.is_file() {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                seen += 1;
            } else if ft.is_socket() {
                let want = if p.ends_with("bubbled.sock") {
                    0o666
                } else {
                    0o600
                };
                assert_eq!(mode(&p), want, "{}", p.display());
            }
        }
    }
    for f in ["kek", "registry.redb", "usage-signing.key"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    assert!(seen > 5, "only {seen} files");
}

/// A VMM that acknowledges SHUTDOWN and keeps running (hostile) is
/// killed after the grace period (2 s); the broker does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_ignores_shutdown_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    let op = bubble_vmm::process::FAULT_LINGER_OP;
    let _ = c.call(call_req(&b.bubble_id, op, b"")).await;
    let started = Instant::now();
    c.delete_bubble(pb::BubbleRef {
        bubble_id: b.bubble_id.clone(),
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "delete waited");
    wait_pid_gone(b.vmm_pid as i32, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "killed before the grace period ended: did it ignore SHUTDOWN?"
    );
}
