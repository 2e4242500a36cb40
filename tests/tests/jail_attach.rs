//! A pooled bubble is charged to the parent that attaches it (issue 12):
//! its VMM boots in the pool's cgroup and, once a parent attaches it,
//! moves into a bubble cgroup under that parent's, leaving no pool cgroup
//! behind; what its guest touches from then on counts against the
//! parent's memory limit, and that limit applies to it. Memory charged
//! while it was pooled follows it only where the kernel moves charges;
//! where it does not (this host's kernel refuses
//! `memory.move_charge_at_immigrate`; cgroup v2 never moves them), the
//! bubble's `jail_warning` says so.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const FAILED: i32 = pb::BubbleState::Failed as i32;

/// `touch` grows linear memory by 256 pages (16 MiB) and writes every
/// 4 KiB page of what it grew, so each call touches 16 MiB the guest
/// never touched before.
const TOUCHER: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "touch") (result i32)
    (local $base i32)
    (local $i i32)
    (local.set $base (memory.grow (i32.const 256)))
    (if (i32.eq (local.get $base) (i32.const -1))
      (then (return (i32.const 1))))
    (local.set $base (i32.shl (local.get $base) (i32.const 16)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 4096)))
        (i32.store
          (i32.add (local.get $base) (i32.shl (local.get $i) (i32.const 12)))
          (local.get $i))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))
)
"#;

const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

fn v1() -> bool {
    Path::new(V1_MEMORY).join("memory.limit_in_bytes").exists()
}

/// The cgroup directory of process `pid` in controller `ctl` (v1), or
/// its unified one.
fn cgroup_dir(pid: u32, ctl: &str) -> PathBuf {
    let (ctl, mount) = if v1() { (ctl, ctl) } else { ("", "") };
    let path = cgroup_of(pid, ctl).expect("a cgroup");
    Path::new("/sys/fs/cgroup")
        .join(mount)
        .join(path.trim_start_matches('/'))
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or(u64::MAX)
}

fn usage(dir: &Path) -> u64 {
    read_u64(&dir.join(if v1() {
        "memory.usage_in_bytes"
    } else {
        "memory.current"
    }))
}

/// Whether this kernel moves memory charges with a task (cgroup v1's
/// `memory.move_charge_at_immigrate`; never on v2), probed on a cgroup
/// made for the purpose.
fn kernel_moves_charges() -> bool {
    if !v1() {
        return false;
    }
    let probe = Path::new(V1_MEMORY).join(format!("bubbled-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).unwrap();
    let moves = std::fs::write(probe.join("memory.move_charge_at_immigrate"), "3").is_ok();
    std::fs::remove_dir(&probe).unwrap();
    moves
}

fn policy() -> pb::SecurityPolicy {
    pb::SecurityPolicy {
        credential_rate: None,
        fuel_per_call: 50_000_000,
        memory_limit_bytes: 64 << 20,
        call_deadline_ms: 30_000,
        max_output_bytes: 64,
        grants: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_pooled_bubble_is_charged_to_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("[[pool]]\nname = \"big\"\nmemory_mib = 128\nsize = 1\n".into()),
            ..Opts::default()
        },
    );
    // The pooled bubble: the first one READY (the log names its VMM).
    let line = bubble_e2e_tests::awaits::log_line(dir.path(), &["bubble ready"]).await;
    let pooled: u32 = line
        .split(" pid=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let mut c = broker.client().await;
    let pool_cg = cgroup_dir(pooled, "memory");
    assert!(
        pool_cg.to_string_lossy().contains("/bubbled-"),
        "{pool_cg:?}"
    );
    assert!(pool_cg.exists(), "{pool_cg:?}");

    // A bubble the parent creates itself: where its bubbles are charged.
    let own = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(own.state, READY, "{}", own.failure_reason);
    let parent_cg = cgroup_dir(own.vmm_pid, "memory")
        .parent()
        .unwrap()
        .to_path_buf();
    assert_ne!(
        pool_cg.parent().unwrap(),
        parent_cg,
        "the pool has a cgroup of its own"
    );

    let b = c
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "big".into(),
            policy: Some(policy()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    assert_eq!(b.vmm_pid, pooled, "attached from the pool, not booted");

    // Moved, in every controller, under the parent's cgroup; the pool
    // cgroup it left is gone.
    let ctls: &[&str] = if v1() {
        &["memory", "pids", "cpu"]
    } else {
        &["memory"]
    };
    wait_until(
        "the attached VMM's cgroups to be under its parent's",
        Duration::from_secs(20),
        || {
            ctls.iter()
                .map(|ctl| {
                    let own = cgroup_dir(own.vmm_pid, ctl);
                    cgroup_dir(pooled, ctl).parent() == own.parent()
                })
                .collect::<Vec<_>>()
        },
        |under| under.iter().all(|u| *u),
    )
    .await;
    let bubble_cg = cgroup_dir(pooled, "memory");
    assert!(
        bubble_cg.to_string_lossy().contains(&b.bubble_id),
        "{bubble_cg:?}"
    );
    let limit = if v1() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    assert_eq!(read_u64(&bubble_cg.join(limit)), (128 << 20) + (64 << 20));
    wait_until(
        "the pool cgroup the VMM left to be removed",
        Duration::from_secs(10),
        || pool_cg.exists(),
        |exists| !exists,
    )
    .await;

    // What could not follow it is said, never silently.
    let moves = kernel_moves_charges();
    let warning = wait_for(&mut c, &b.bubble_id, Duration::from_secs(10), |d| {
        moves || !d.jail_warning.is_empty()
    })
    .await
    .jail_warning;
    if moves {
        assert_eq!(warning, "", "charges moved: nothing to warn of");
    } else {
        assert!(
            warning.contains("stays with the pool's cgroup"),
            "{warning:?}"
        );
    }

    // What its guest touches now is charged to the parent.
    c.load_portion(pb::LoadPortionRequest {
        bubble_id: b.bubble_id.clone(),
        name: "toucher".into(),
        module: wat::parse_str(TOUCHER).unwrap(),
    })
    .await
    .unwrap();
    let before = usage(&parent_cg);
    let out = c
        .call(portion_call(&b.bubble_id, "toucher", "touch", b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.output, b"");
    let after = usage(&parent_cg);
    assert!(
        after >= before + (14 << 20),
        "the parent's usage grew by {} KiB, not by the 16 MiB its bubble touched",
        (after.saturating_sub(before)) >> 10
    );
    assert!(usage(&bubble_cg) >= 14 << 20);

    // The parent's limit applies to it: lowered (as an operator could)
    // to just above what the parent's bubbles use, the next 16 MiB the
    // attached bubble touches get it killed by the kernel. A kill at a
    // parent's limit is not the bubble's own limit: it fails as
    // `vmm_killed` (docs/jail.md, "Over the limit").
    let lowered = usage(&parent_cg) + (4 << 20);
    std::fs::write(parent_cg.join(limit), lowered.to_string()).unwrap();
    c.call(portion_call(&b.bubble_id, "toucher", "touch", b""))
        .await
        .expect_err("a call over the parent's memory limit cannot succeed");
    let failed = wait_for(&mut c, &b.bubble_id, Duration::from_secs(20), |b| {
        b.state == FAILED
    })
    .await;
    assert!(
        failed.failure_reason.contains("killed"),
        "reason: {:?}",
        failed.failure_reason
    );
    wait_pid_gone(pooled as i32, Duration::from_secs(10)).await;
    wait_until(
        "the failed bubble's cgroup to be removed",
        Duration::from_secs(10),
        || bubble_cg.exists(),
        |exists| !exists,
    )
    .await;
}

/// Attaches deleted at once, or around the moment their VMM is moved
/// (the move starts 5 ms after the attach; the delete here comes 0–9 ms
/// after it): whichever wins, no cgroup of those bubbles is left in any
/// controller, under the pool's parent or the attaching one, and no VMM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaches_deleted_during_their_move_leave_no_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            config: Some("[[pool]]\nname = \"small\"\nmemory_mib = 16\nsize = 2\n".into()),
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    // The broker's hierarchy, in each controller, from a bubble of its own.
    let own = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    let ctls: &[&str] = if v1() {
        &["memory", "pids", "cpu"]
    } else {
        &["memory"]
    };
    let bases: Vec<PathBuf> = ctls
        .iter()
        .map(|ctl| {
            let d = cgroup_dir(own.vmm_pid, ctl);
            d.parent().unwrap().parent().unwrap().to_path_buf()
        })
        .collect();
    let mut attached = Vec::new();
    for i in 0..10u64 {
        let b = c
            .attach_bubble(pb::AttachBubbleRequest {
                profile: "small".into(),
                wait_ms: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        // Schedule variation around the move, not synchronisation.
        tokio::time::sleep(Duration::from_millis(i)).await;
        c.delete_bubble(pb::BubbleRef {
            bubble_id: b.bubble_id.clone(),
        })
        .await
        .unwrap();
        attached.push((b.bubble_id, b.vmm_pid));
    }
    for (_, pid) in &attached {
        wait_pid_gone(*pid as i32, Duration::from_secs(20)).await;
    }
    let left = || {
        let mut found = Vec::new();
        for base in &bases {
            for p in std::fs::read_dir(base).into_iter().flatten().flatten() {
                for b in std::fs::read_dir(p.path()).into_iter().flatten().flatten() {
                    let name = b.file_name().to_string_lossy().into_owned();
                    if attached.iter().any(|(id, _)| name.starts_with(id.as_str())) {
                        found.push(b.path());
                    }
                }
            }
        }
        found
    };
    wait_until(
        "the attached bubbles' cgroups to be removed",
        Duration::from_secs(10),
        left,
        Vec::is_empty,
    )
    .await;
    // The broker's own bubble is untouched.
    assert!(cgroup_dir(own.vmm_pid, "memory").exists());
}
