//! The metrics measured without a broker: the raw KVM floors and offline
//! report verification.

use std::time::Instant;

use anyhow::Context;

use serde_json::json;

use crate::stats::{round, stat, us, Stat};

/// Create VM + vCPU + memory, enter a minimal CPL-3 guest, until its first
/// exit; with the prepared variant's p50 as an extra.
pub(crate) fn raw_kvm_floor() -> anyhow::Result<Stat> {
    // Warm up the page cache and KVM module paths first.
    for _ in 0..5 {
        bubble_vmm::floor::raw_kvm_floor()?;
    }
    let mut v = Vec::new();
    let mut prepared = Vec::new();
    for _ in 0..100 {
        v.push(bubble_vmm::floor::raw_kvm_floor()?);
        prepared.push(bubble_vmm::floor::raw_kvm_floor_prepared()?);
    }
    let mut s = stat(v);
    s.extra.insert(
        "prepared_p50_us".into(),
        json!(round(us(stat(prepared).p50))),
    );
    Ok(s)
}

/// One CPL-3 exit round trip.
pub(crate) fn raw_exit_rtt() -> anyhow::Result<Stat> {
    // 20 batches of 500 exits: 10,000 exits; each sample is a batch mean.
    let mut v = Vec::new();
    for _ in 0..20 {
        v.push(bubble_vmm::floor::raw_exit_rtt(500)?);
    }
    let mut s = stat(v);
    s.extra.insert("exits".into(), json!(10_000));
    Ok(s)
}

/// Offline verification of the real Milan report from Google Cloud with
/// its VCEK against AMD's built-in roots.
pub(crate) fn verify_report() -> anyhow::Result<Stat> {
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/snp-real");
    let report = std::fs::read(data.join("gcp-milan-report.bin"))?;
    let vcek =
        bubble_attestation::verify::cert_der(&std::fs::read(data.join("gcp-milan-vcek.pem"))?)?;
    let mut v = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = bubble_attestation::Report::parse(&report)?;
        bubble_attestation::verify_amd(&r, &vcek, None)?;
        v.push(t.elapsed());
    }
    Ok(stat(v))
}

/// The jail's own cost on a fresh (non-spare) start: what the VMM logs as
/// `jail_setup_us` (socket, `/dev/kvm`, namespaces, fork, pivot_root,
/// identity, hygiene, linger thread), over 30 starts of this binary as a
/// VMM; the same without namespaces (hygiene only) is an extra.
pub(crate) fn jail_setup() -> anyhow::Result<Stat> {
    let dir = tempfile::Builder::new().prefix("bubble-jail-").tempdir()?;
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut jailed = Vec::new();
    let mut bare = Vec::new();
    for i in 0..30u32 {
        // An id of its own from the top of the default range, as a broker
        // would lend it (a killed VMM's threads may linger a moment).
        let jail = bubble_vmm::jail::JailArgs {
            id: root.then_some((265_535 - i, 265_535 - i)),
            userns: !root,
            hold_fd: None,
        };
        let i = i as usize;
        jailed.push(one_start(dir.path(), i, Some(&jail))?);
        bare.push(one_start(dir.path(), i, None)?);
    }
    let mut s = stat(jailed);
    s.extra.insert(
        "without_namespaces_p50_us".into(),
        json!(round(us(stat(bare).p50))),
    );
    s.extra.insert("starts".into(), json!(30));
    Ok(s)
}

/// Starts this binary as a fresh VMM, reads its `jail_setup_us=` line,
/// then kills it (a jailed VMM dies with its waiter).
fn one_start(
    dir: &std::path::Path,
    i: usize,
    jail: Option<&bubble_vmm::jail::JailArgs>,
) -> anyhow::Result<std::time::Duration> {
    use std::io::BufRead;
    let args = bubble_vmm::process::VmmArgs {
        bubble_id: format!("b-jail-{i}"),
        memory_mib: 16,
        image: bubble_vmm::images::GuestImage::Shim,
        socket: dir.join(format!("{i}.sock")),
        max_payload: 1 << 20,
        boot_timeout: std::time::Duration::from_secs(20),
        restore: false,
        image_fd: None,
        poll: bubble_vmm::process::DEFAULT_POLL,
        parent_pid: Some(std::process::id()),
        restore_deadline: bubble_vmm::process::DEFAULT_RESTORE_DEADLINE,
    };
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(bubbled::VMM_SUBCOMMAND)
        .args(args.to_args())
        .args(jail.map(|j| j.to_args()).unwrap_or_default())
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut found = None;
    let mut last = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        last.clone_from(&line);
        if let Some(rest) = line.split("jail_setup_us=").nth(1) {
            let us: u64 = rest.split_whitespace().next().unwrap_or("").parse()?;
            found = Some(std::time::Duration::from_micros(us));
            break;
        }
    }
    child.kill()?;
    child.wait()?;
    found.with_context(|| format!("the VMM did not log jail_setup_us: {last}"))
}
