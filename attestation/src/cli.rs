//! `bubblectl attest verify`: offline verification with exit codes
//! 0 verified and policy met, 1 usage or I/O error, 2 signature or chain
//! invalid, 3 policy not met.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::report::Report;
use crate::verify::{self, Product, Verified};
use crate::Policy;

/// Exit code: verified and policy met.
pub const EXIT_OK: i32 = 0;
/// Exit code: usage or I/O error.
pub const EXIT_USAGE: i32 = 1;
/// Exit code: signature or chain invalid.
pub const EXIT_INVALID: i32 = 2;
/// Exit code: policy not met.
pub const EXIT_POLICY: i32 = 3;

/// Arguments of `attest verify`.
#[derive(Clone, Debug, Default)]
pub struct VerifyArgs {
    /// Report file (raw 1184 bytes or hex).
    pub report: PathBuf,
    /// VCEK certificate (PEM or DER).
    pub vcek: PathBuf,
    /// Product (default: from the VCEK's issuer).
    pub product: Option<String>,
    /// Policy file (TOML or JSON).
    pub policy: Option<PathBuf>,
    /// For simulated reports: the ASK (PEM or DER).
    pub sim_ask: Option<PathBuf>,
    /// For simulated reports: the operator's ARK to trust (PEM or DER).
    pub sim_ark: Option<PathBuf>,
    /// JSON output.
    pub json: bool,
}

fn tcb_str(t: &crate::Tcb) -> String {
    let mut s = format!(
        "bootloader={} tee={} snp={} microcode={}",
        t.bootloader, t.tee, t.snp, t.microcode
    );
    if let Some(f) = t.fmc {
        s.push_str(&format!(" fmc={f}"));
    }
    s
}

/// The fields shown for a report (human and JSON alike).
pub fn describe(report: &Report, verified: Option<&Verified>) -> serde_json::Value {
    let sim = report.is_simulated();
    json!({
        "version": report.version,
        "tee": if sim { "SIMULATED (virtual PSP, no hardware protection)" } else { "AMD SEV-SNP" },
        "simulated": sim,
        "product": verified.and_then(|v| v.product).map(|p| p.name()).unwrap_or(if sim { "none (simulated)" } else { "unknown" }),
        "chip_id": hex::encode(report.chip_id),
        "tcb": verified.map(|v| tcb_str(&v.tcb)).unwrap_or_else(|| {
            format!("{} (reported, unverified)", tcb_str(&report.reported_tcb()))
        }),
        "guest_policy": {
            "raw": format!("{:#x}", report.policy),
            "abi": format!("{}.{}", (report.policy >> 8) & 0xff, report.policy & 0xff),
            "smt_allowed": report.smt_allowed(),
            "migrate_ma_allowed": report.migrate_ma_allowed(),
            "debug_allowed": report.debug_allowed(),
        },
        "vmpl": report.vmpl,
        "measurement": hex::encode(report.measurement),
        "report_data": hex::encode(report.report_data),
        "host_data": hex::encode(report.host_data),
    })
}

fn emit(
    out: &mut dyn Write,
    json_out: bool,
    mut v: serde_json::Value,
    verdict: &str,
    detail: &[String],
) {
    v["verdict"] = json!(verdict);
    v["problems"] = json!(detail);
    if json_out {
        let _ = writeln!(out, "{v}");
        return;
    }
    let field = |k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    for (label, k) in [
        ("Version", "version"),
        ("TEE", "tee"),
        ("Product", "product"),
        ("Chip id", "chip_id"),
        ("TCB", "tcb"),
        ("VMPL", "vmpl"),
        ("Measurement", "measurement"),
        ("REPORT_DATA", "report_data"),
    ] {
        let _ = writeln!(out, "{label:<14}{}", field(k));
    }
    let gp = &v["guest_policy"];
    let _ = writeln!(
        out,
        "{:<14}{} (ABI {}, SMT {}, migration agent {}, debug {})",
        "Guest policy",
        gp["raw"].as_str().unwrap_or(""),
        gp["abi"].as_str().unwrap_or(""),
        if gp["smt_allowed"] == json!(true) {
            "allowed"
        } else {
            "no"
        },
        if gp["migrate_ma_allowed"] == json!(true) {
            "allowed"
        } else {
            "no"
        },
        if gp["debug_allowed"] == json!(true) {
            "ALLOWED"
        } else {
            "no"
        },
    );
    let _ = writeln!(out, "{:<14}{verdict}", "Result");
    for d in detail {
        let _ = writeln!(out, "  - {d}");
    }
}

/// Runs `attest verify`; returns the exit code.
pub fn verify_command(args: &VerifyArgs, out: &mut dyn Write) -> i32 {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let usage = |out: &mut dyn Write, m: String| {
        let _ = writeln!(out, "error: {m}");
        EXIT_USAGE
    };
    let report_bytes = match read(&args.report) {
        Ok(b) => b,
        Err(e) => return usage(out, e),
    };
    let report = match Report::parse_any(&report_bytes) {
        Ok(r) => r,
        // A report-sized blob with a bad version is a modified report.
        Err(e @ crate::ReportError::Version(_)) => {
            let _ = writeln!(out, "INVALID: {}: {e}", args.report.display());
            return EXIT_INVALID;
        }
        Err(e) => return usage(out, format!("{}: {e}", args.report.display())),
    };
    let vcek = match read(&args.vcek).and_then(|b| verify::cert_der(&b).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => return usage(out, e),
    };
    let policy = match &args.policy {
        None => Policy::default(),
        Some(p) => match read(p).and_then(|b| {
            Policy::from_text(&String::from_utf8_lossy(&b))
                .map_err(|e| format!("{}: {e}", p.display()))
        }) {
            Ok(p) => p,
            Err(e) => return usage(out, e),
        },
    };
    let product = match args.product.as_deref() {
        None => None,
        Some(p) => match Product::from_name(p) {
            Some(p) => Some(p),
            None => return usage(out, format!("unknown product {p:?} (milan, genoa, turin)")),
        },
    };
    let result = if report.is_simulated() {
        let (Some(ask), Some(ark)) = (&args.sim_ask, &args.sim_ark) else {
            emit(out, args.json, describe(&report, None), "INVALID", &[
                "SIMULATED report: verifying it needs the operator's chain (--sim-ask, --sim-ark)".into(),
            ]);
            return EXIT_INVALID;
        };
        let ask = match read(ask).and_then(|b| verify::cert_der(&b).map_err(|e| e.to_string())) {
            Ok(b) => b,
            Err(e) => return usage(out, e),
        };
        let ark = match read(ark).and_then(|b| verify::cert_der(&b).map_err(|e| e.to_string())) {
            Ok(b) => b,
            Err(e) => return usage(out, e),
        };
        verify::verify_sim(&report, &vcek, &ask, &ark)
    } else {
        verify::verify_amd(&report, &vcek, product)
    };
    match result {
        Err(e) => {
            emit(
                out,
                args.json,
                describe(&report, None),
                "INVALID",
                &[e.to_string()],
            );
            EXIT_INVALID
        }
        Ok(v) => {
            let problems = policy.violations(&report, &v.tcb);
            if problems.is_empty() {
                emit(
                    out,
                    args.json,
                    describe(&report, Some(&v)),
                    "VERIFIED, policy met",
                    &[],
                );
                EXIT_OK
            } else {
                emit(
                    out,
                    args.json,
                    describe(&report, Some(&v)),
                    "VERIFIED, POLICY NOT MET",
                    &problems,
                );
                EXIT_POLICY
            }
        }
    }
}
