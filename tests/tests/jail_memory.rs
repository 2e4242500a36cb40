//! A bubble's memory limit is enforced by its cgroup (issue 12), as the
//! attack: a guest that touches more memory than its VMM's cgroup allows
//! gets its VMM killed by the kernel, the bubble FAILED with reason
//! `memory_limit`, and the broker and every other bubble keep serving.
//!
//! The limit the broker sets (guest memory + VMM overhead) cannot be
//! crossed by guest pages alone, which is the point of it; so the test
//! lowers one bubble's limit (as root, the way an operator could) to just
//! above what it uses, then has its guest touch 32 MiB more.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;
const FAILED: i32 = pb::BubbleState::Failed as i32;

/// `touch` grows linear memory by 512 pages (32 MiB) and writes every
/// page of it.
const TOUCHER: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "touch") (result i32)
    (local $i i32)
    (if (i32.eq (memory.grow (i32.const 512)) (i32.const -1))
      (then (return (i32.const 1))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 8192)))
        (i32.store (i32.shl (local.get $i) (i32.const 12)) (local.get $i))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))
)
"#;

/// The memory cgroup directory of process `pid` (v1 `memory` controller,
/// or the unified hierarchy).
fn memory_cgroup(pid: u32) -> (PathBuf, bool) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let want = if v1 { "memory" } else { "" };
    let path = text
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
            ctls.split(',').any(|c| c == want).then(|| path.to_string())
        })
        .expect("a memory cgroup");
    let base = if v1 {
        "/sys/fs/cgroup/memory"
    } else {
        "/sys/fs/cgroup"
    };
    (Path::new(base).join(path.trim_start_matches('/')), v1)
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_over_its_cgroup_memory_limit_fails_only_its_bubble() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            admin: true,
            ..Opts::default()
        },
    );
    let mut c = broker.client().await;
    let policy = pb::SecurityPolicy {
        credential_rate: None,
        fuel_per_call: 50_000_000,
        memory_limit_bytes: 64 << 20,
        call_deadline_ms: 30_000,
        max_output_bytes: 64,
        grants: vec![],
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let b = c
            .create_bubble(pb::CreateBubbleRequest {
                policy: Some(policy.clone()),
                ..create_req(128)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.state, READY, "{}", b.failure_reason);
        assert_eq!(b.jail_warning, "", "cgroups are writable here");
        c.load_portion(pb::LoadPortionRequest {
            bubble_id: b.bubble_id.clone(),
            name: "toucher".into(),
            module: wat::parse_str(TOUCHER).unwrap(),
        })
        .await
        .unwrap();
        ids.push(b);
    }
    let (victim, other) = (&ids[0], &ids[1]);
    let (cg, v1) = memory_cgroup(victim.vmm_pid);
    let (usage, limit) = if v1 {
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
    } else {
        ("memory.current", "memory.max")
    };
    // The broker's limit: guest memory + the VMM's overhead.
    assert_eq!(read_u64(&cg.join(limit)), (128 << 20) + (64 << 20));
    let used = read_u64(&cg.join(usage));
    let lowered = used + (8 << 20);
    std::fs::write(cg.join(limit), lowered.to_string()).unwrap();
    assert_eq!(read_u64(&cg.join(limit)), lowered);

    // 32 MiB more than it had: over the lowered limit by 24 MiB.
    let e = c
        .call(portion_call(&victim.bubble_id, "toucher", "touch", b""))
        .await
        .expect_err("a call that crossed the memory limit cannot succeed");
    assert_ne!(e.code(), tonic::Code::Ok);
    let b = wait_for(&mut c, &victim.bubble_id, Duration::from_secs(20), |b| {
        b.state == FAILED
    })
    .await;
    assert!(
        b.failure_reason.contains("memory limit"),
        "reason: {:?}",
        b.failure_reason
    );
    // Counted under its typed kind, and no other failure.
    let failures: Vec<String> = broker
        .admin_get("/metrics")
        .lines()
        .filter(|l| l.starts_with("bubbled_failures_total") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        failures,
        vec![r#"bubbled_failures_total{reason="memory_limit"} 1"#.to_string()]
    );
    wait_pid_gone(victim.vmm_pid as i32, Duration::from_secs(10)).await;

    // The other bubble, with the same module, under its own limit: fine.
    let out = c
        .call(portion_call(&other.bubble_id, "toucher", "touch", b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.output, b"");
    let d = describe(&mut c, &other.bubble_id).await;
    assert_eq!(d.state, READY);
    // And the broker takes new work.
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
}
