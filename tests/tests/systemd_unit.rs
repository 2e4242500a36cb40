//! The shipped systemd unit (`packaging/bubbled.service`, issue 14): it
//! verifies cleanly, its offline exposure score stays under a bound, and a
//! broker run with exactly its capability bounding set and
//! `no_new_privs` (applied with `setpriv`, as systemd would apply them)
//! still jails, calls, suspends, restores and deletes bubbles. CI has no
//! systemd as PID 1, so the unit's file-system and namespace options are
//! not exercised here (docs/operations.md).

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

const READY: i32 = pb::BubbleState::Ready as i32;

/// The highest overall exposure `systemd-analyze security` may give.
const MAX_EXPOSURE: f64 = 7.0;

fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/bubbled.service");
    std::fs::read_to_string(p).unwrap()
}

/// The values of `key=` in the unit's `[Service]` section.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            if in_service {
                out.push(v.trim().to_string());
            }
        }
    }
    out
}

/// A tool CI must have; outside CI its absence skips the test loudly.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    if found.is_none() {
        missing_dependency(name);
    }
    found
}

/// The unit with `ExecStart` pointing at the broker built for the tests.
fn unit_for_tests(dir: &Path) -> PathBuf {
    let text = unit_text().replace(
        "/usr/local/bin/bubbled",
        &broker_bin().display().to_string(),
    );
    let p = dir.join("bubbled.service");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_unit_verifies_and_its_exposure_stays_bounded() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let unit = unit_text();
    assert_eq!(service_values(&unit, "KillMode"), ["process"]);
    let dir = tempfile::tempdir().unwrap();
    let path = unit_for_tests(dir.path());
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {out:?}"
    );
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("bubbled.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{text}"
    );
}

/// `setpriv` arguments applying the unit's capability bounding set and
/// `NoNewPrivileges`.
fn setpriv_for(unit: &str) -> Vec<String> {
    let caps = service_values(unit, "CapabilityBoundingSet");
    assert_eq!(caps.len(), 1, "one CapabilityBoundingSet line");
    let keep: Vec<String> = caps[0]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(keep.len() >= 5, "{keep:?}");
    let mut args = vec![
        "--bounding-set".to_string(),
        format!("-all,{}", keep.join(",")),
    ];
    if service_values(unit, "NoNewPrivileges") == ["yes"] {
        args.push("--no-new-privs".into());
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_works_with_the_units_capabilities_and_no_new_privs() {
    let Some(setpriv) = tool("setpriv") else {
        return;
    };
    let unit = unit_text();
    let mut wrapper = vec![setpriv.display().to_string()];
    wrapper.extend(setpriv_for(&unit));
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start_with(
        dir.path(),
        Opts {
            wrapper,
            ..Opts::default()
        },
    );
    // What the broker runs with is what the unit says.
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.pid())).unwrap();
    let field = |n: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(n))
            .map(|v| v.trim().to_string())
            .unwrap()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_ne!(field("CapBnd:"), "000001ffffffffff");
    let mut c = broker.client().await;
    wait_spares_ready(dir.path(), 1, std::time::Duration::from_secs(30)).await;
    let b = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(b.state, READY, "{}", b.failure_reason);
    assert_eq!(b.jail_warning, "", "the jail is complete under the unit");
    let vmm = std::fs::read_to_string(format!("/proc/{}/status", b.vmm_pid)).unwrap();
    assert!(vmm.lines().any(|l| l == "Seccomp:\t2"), "{vmm}");
    assert!(!vmm.lines().any(|l| l.starts_with("Uid:\t0\t")), "{vmm}");
    let echo = |id: &str, what: &[u8]| call_req(id, "echo", what);
    let out = c.call(echo(&b.bubble_id, b"one")).await.unwrap();
    assert_eq!(out.into_inner().output, b"one");
    c.suspend_bubble(suspend_req(&b.bubble_id, b""))
        .await
        .unwrap();
    let r = c
        .restore_bubble(restore_req(&b.bubble_id, b"", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, READY, "{}", r.failure_reason);
    let out = c.call(echo(&b.bubble_id, b"two")).await.unwrap();
    assert_eq!(out.into_inner().output, b"two");
    c.delete_bubble(pb::BubbleRef {
        bubble_id: b.bubble_id.clone(),
    })
    .await
    .unwrap();
}
