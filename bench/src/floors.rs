//! The metrics measured without a broker: the raw KVM floors and offline
//! report verification.

use std::time::Instant;

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
