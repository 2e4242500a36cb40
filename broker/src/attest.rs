//! Attestation on the broker.
//!
//! MEASUREMENT is not computed here: each bubble's VMM records the SNP
//! launch digest while it loads the guest (`bubble_vmm::load`) and the
//! broker asks it (`Broker::measurement`, control request `MEASUREMENT`)
//! before the TEE backend signs a report. This host has no SEV-SNP, so
//! reports come from the **simulated** virtual PSP (`DATA_DIR/psp`), and
//! say so: CHIP_ID `BUBBLE-SIMULATED…`, TEE `sim`.
//!
//! This module is the offline side, for verifiers: the digest a bubble of
//! an image will report, computed by the VMM's own loader into memory that
//! no VM uses (no KVM needed), and its page list (`bubblectl measure`).

use bubble_vmm::images::GuestImage;
use bubble_vmm::launch::LaunchLog;
use bubble_vmm::vm::VmError;
use serde_json::json;

/// The launch record of a bubble booted from `image` with `memory_mib` of
/// memory and a mailbox for `max_payload`; its `digest()` is the
/// MEASUREMENT such a bubble reports.
pub fn expected_measurement(
    image: &GuestImage,
    memory_mib: u32,
    max_payload: usize,
) -> Result<LaunchLog, VmError> {
    bubble_vmm::load::measure_offline(image, u64::from(memory_mib) << 20, max_payload as u64)
}

/// The page list as text: one line per range (GPA, type, length, content
/// SHA-384 or `-`).
pub fn explain_text(log: &LaunchLog) -> String {
    let mut s = format!("{:<18} {:<10} {:>10}  sha384\n", "gpa", "type", "length");
    for r in log.ranges() {
        s.push_str(&format!(
            "{:#018x} {:<10} {:>10}  {}\n",
            r.gpa,
            r.page_type.name(),
            r.len,
            r.sha384.map(hex::encode).unwrap_or_else(|| "-".into())
        ));
    }
    s
}

/// The page list as JSON objects `{gpa, type, length, sha384}` (`sha384`
/// null for pages whose PAGE_INFO carries no content hash).
pub fn explain_json(log: &LaunchLog) -> serde_json::Value {
    log.ranges()
        .map(|r| {
            json!({
                "gpa": format!("{:#x}", r.gpa),
                "type": r.page_type.name(),
                "length": r.len,
                "sha384": r.sha384.map(hex::encode),
            })
        })
        .collect()
}

/// `bubblectl measure`: prints the digest (and with `explain` the page
/// list) of `image` (`shim` or an ELF file), as text or JSON.
pub fn print_measure(
    image: &str,
    explain: bool,
    memory_mib: u32,
    max_payload: usize,
    json: bool,
) -> Result<(), VmError> {
    let img = match image {
        "shim" => GuestImage::Shim,
        path => GuestImage::Elf(path.into()),
    };
    let log = expected_measurement(&img, memory_mib, max_payload)?;
    let m = hex::encode(log.digest());
    if json {
        let mut v = json!({"image": image, "memory_mib": memory_mib,
            "max_payload": max_payload, "measurement": m});
        if explain {
            v["pages"] = explain_json(&log);
        }
        println!("{v}");
    } else if explain {
        println!("{}measurement {m}", explain_text(&log));
    } else {
        println!("{m}");
    }
    Ok(())
}
