//! `bubblectl attest verify`: offline verification with exit codes
//! 0 verified and policy met, 1 usage or I/O error, 2 signature or chain
//! invalid, 3 policy not met.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::certs::{self, CertSet};
use crate::report::{Report, SigningKey};
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
    /// Report file: raw 1184 bytes, hex, or an extended report (the
    /// report, optionally behind its `MSG_REPORT_RSP` header, followed by
    /// its certificate table; see [`crate::extended`]).
    pub report: PathBuf,
    /// VCEK certificate (PEM or DER).
    pub vcek: Option<PathBuf>,
    /// VLEK certificate (PEM or DER).
    pub vlek: Option<PathBuf>,
    /// A directory as `snpguest` writes it (`ark`, `ask`/`asvk`, `vcek`
    /// or `vlek`, PEM or DER, optionally `certs.bin`).
    pub certs: Option<PathBuf>,
    /// An extended-report certificate table file.
    pub cert_table: Option<PathBuf>,
    /// Product (default: from the report's CPUID, version ≥ 3, else the
    /// certificate's issuer); refused if it disagrees with CPUID.
    pub product: Option<String>,
    /// Policy file (TOML or JSON).
    pub policy: Option<PathBuf>,
    /// For simulated reports: the ASK (PEM or DER).
    pub sim_ask: Option<PathBuf>,
    /// For simulated reports: the operator's ARK to trust (PEM or DER).
    pub sim_ark: Option<PathBuf>,
    /// Expected MEASUREMENT (96 hex digits).
    pub expect_measurement: Option<String>,
    /// Expected HOST_DATA (64 hex digits).
    pub expect_host_data: Option<String>,
    /// Expected REPORT_DATA (128 hex digits).
    pub expect_report_data: Option<String>,
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

fn tcb_of(raw: u64, turin: bool) -> String {
    tcb_str(&crate::Tcb::decode(raw, turin))
}

/// The fields shown for a report (human and JSON alike).
pub fn describe(report: &Report, verified: Option<&Verified>) -> serde_json::Value {
    let sim = report.is_simulated();
    let turin = verified.and_then(|v| v.product).or(report.cpuid_product()) == Some(Product::Turin);
    let ver = |(a, b, c): (u8, u8, u8)| format!("{a}.{b}.{c}");
    json!({
        "version": report.version,
        "tee": if sim { "SIMULATED (virtual PSP, no hardware protection)" } else { "AMD SEV-SNP" },
        "simulated": sim,
        "product": verified.and_then(|v| v.product).map(|p| p.name()).unwrap_or(if sim { "none (simulated)" } else { "unknown" }),
        "cpuid": if report.version >= 3 {
            json!(format!("family {:#04x} model {:#04x} stepping {:#x} ({})", report.cpuid_fam, report.cpuid_model, report.cpuid_step,
                report.cpuid_product().map(|p| p.name()).unwrap_or("unknown product")))
        } else { json!("not in version 2 reports") },
        "signing_key": report.signing_key().name(),
        "signature_algo": report.sig_algo,
        "author_key_en": report.author_key_en(),
        "mask_chip_key": report.mask_chip_key(),
        "csp_id": verified.and_then(|v| v.csp_id.clone()),
        "chip_id": hex::encode(report.chip_id),
        "tcb": verified.map(|v| tcb_str(&v.tcb)).unwrap_or_else(|| {
            format!("{} (reported, unverified)", tcb_of(report.reported_tcb_raw, turin))
        }),
        "current_tcb": tcb_of(report.current_tcb_raw, turin),
        "committed_tcb": tcb_of(report.committed_tcb_raw, turin),
        "launch_tcb": tcb_of(report.launch_tcb_raw, turin),
        "firmware": format!("current {}, committed {}", ver(report.current_version), ver(report.committed_version)),
        "platform_info": {
            "raw": format!("{:#x}", report.platform_info),
            "flags": report.platform_flags(),
        },
        "guest_svn": report.guest_svn,
        "guest_policy": {
            "raw": format!("{:#x}", report.policy),
            "abi": format!("{}.{}", (report.policy >> 8) & 0xff, report.policy & 0xff),
            "smt_allowed": report.smt_allowed(),
            "migrate_ma_allowed": report.migrate_ma_allowed(),
            "debug_allowed": report.debug_allowed(),
        },
        "vmpl": report.vmpl,
        "family_id": hex::encode(report.family_id),
        "image_id": hex::encode(report.image_id),
        "id_key_digest": hex::encode(report.id_key_digest),
        "author_key_digest": hex::encode(report.author_key_digest),
        "launch_mit_vector": report.launch_mit_vector.map(|v| format!("{v:#x}")),
        "current_mit_vector": report.current_mit_vector.map(|v| format!("{v:#x}")),
        "measurement": hex::encode(report.measurement),
        "report_data": hex::encode(report.report_data),
        "host_data": hex::encode(report.host_data),
    })
}

/// The line printed when nothing about the guest was pinned.
pub const UNPINNED: &str =
    "UNPINNED: no expected measurement, HOST_DATA or REPORT_DATA was given; \
this shows only that a genuine platform signed this report, not which code or bubble it describes";

fn emit(
    out: &mut dyn Write,
    json_out: bool,
    mut v: serde_json::Value,
    verdict: &str,
    detail: &[String],
    pinned: bool,
) {
    v["verdict"] = json!(verdict);
    v["problems"] = json!(detail);
    v["pinned"] = json!(pinned);
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
        ("CPUID", "cpuid"),
        ("Signing key", "signing_key"),
        ("Sig. algo", "signature_algo"),
        ("CSP id", "csp_id"),
        ("Chip id", "chip_id"),
        ("TCB", "tcb"),
        ("Current TCB", "current_tcb"),
        ("Committed TCB", "committed_tcb"),
        ("Launch TCB", "launch_tcb"),
        ("Firmware", "firmware"),
        ("Guest SVN", "guest_svn"),
        ("VMPL", "vmpl"),
        ("ID key", "id_key_digest"),
        ("Author key", "author_key_digest"),
        ("Launch mit.", "launch_mit_vector"),
        ("Current mit.", "current_mit_vector"),
        ("Measurement", "measurement"),
        ("HOST_DATA", "host_data"),
        ("REPORT_DATA", "report_data"),
    ] {
        if v.get(k).is_some_and(|x| !x.is_null()) {
            let _ = writeln!(out, "{label:<14}{}", field(k));
        }
    }
    let pi = &v["platform_info"];
    let _ = writeln!(
        out,
        "{:<14}{} ({})",
        "Platform",
        pi["raw"].as_str().unwrap_or(""),
        pi["flags"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    let gp = &v["guest_policy"];
    let yes = |k: &str, y: &'static str| if gp[k] == json!(true) { y } else { "no" };
    let _ = writeln!(
        out,
        "{:<14}{} (ABI {}, SMT {}, migration agent {}, debug {})",
        "Guest policy",
        gp["raw"].as_str().unwrap_or(""),
        gp["abi"].as_str().unwrap_or(""),
        yes("smt_allowed", "allowed"),
        yes("migrate_ma_allowed", "allowed"),
        yes("debug_allowed", "ALLOWED"),
    );
    let _ = writeln!(out, "{:<14}{verdict}", "Result");
    for d in detail {
        let _ = writeln!(out, "  - {d}");
    }
    if !pinned {
        let _ = writeln!(out, "{UNPINNED}");
    }
}

/// A hex argument of exactly `len` bytes, lowercased.
fn expect_hex(name: &str, v: &str, len: usize) -> Result<String, String> {
    let v = v.trim();
    match hex::decode(v) {
        Ok(b) if b.len() == len => Ok(v.to_ascii_lowercase()),
        _ => Err(format!("{name}: expected {} hex digits", 2 * len)),
    }
}

fn load_policy(args: &VerifyArgs) -> Result<Policy, String> {
    let mut policy = match &args.policy {
        // No policy file: the CLI accepts any measurement and says UNPINNED.
        None => Policy {
            allow_any_measurement: true,
            ..Policy::default()
        },
        Some(p) => {
            let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Policy::from_text(&String::from_utf8_lossy(&b))
                .map_err(|e| format!("{}: {e}", p.display()))?
        }
    };
    if let Some(m) = &args.expect_measurement {
        policy.allowed_measurements = vec![expect_hex("--expect-measurement", m, 48)?];
    }
    if let Some(h) = &args.expect_host_data {
        policy.expected_host_data = Some(expect_hex("--expect-host-data", h, 32)?);
    }
    if let Some(r) = &args.expect_report_data {
        policy.expected_report_data = Some(expect_hex("--expect-report-data", r, 64)?);
    }
    Ok(policy)
}

fn read_der(p: &std::path::Path) -> Result<Vec<u8>, String> {
    certs::read_cert(p).map_err(|e| e.to_string())
}

/// Every certificate the arguments name: explicit files win over the
/// `--cert-table` file, which wins over a table that followed the report
/// in its own file, which wins over the directory. `ark` is only ever
/// `--sim-ark` (AMD reports use the built-in roots).
fn gather_certs(args: &VerifyArgs, embedded: Option<CertSet>) -> Result<CertSet, String> {
    let mut set = match &args.certs {
        Some(d) => certs::read_cert_dir(d).map_err(|e| format!("{}: {e}", d.display()))?,
        None => CertSet::default(),
    };
    let overlay = |set: &mut CertSet, t: CertSet| {
        set.ark = t.ark.or(set.ark.take());
        set.ask = t.ask.or(set.ask.take());
        set.vcek = t.vcek.or(set.vcek.take());
        set.vlek = t.vlek.or(set.vlek.take());
    };
    if let Some(t) = embedded {
        overlay(&mut set, t);
    }
    if let Some(t) = &args.cert_table {
        let b = std::fs::read(t).map_err(|e| format!("{}: {e}", t.display()))?;
        let t = certs::parse_cert_table(&b).map_err(|e| format!("{}: {e}", t.display()))?;
        overlay(&mut set, t);
    }
    if let Some(p) = &args.vcek {
        set.vcek = Some(read_der(p)?);
    }
    if let Some(p) = &args.vlek {
        set.vlek = Some(read_der(p)?);
    }
    if let Some(p) = &args.sim_ask {
        set.ask = Some(read_der(p)?);
    }
    // The ARK of a simulated chain is trusted, so it must be named
    // explicitly: never taken from a directory or table that came with
    // the report.
    set.ark = match &args.sim_ark {
        Some(p) => Some(read_der(p)?),
        None => None,
    };
    Ok(set)
}

/// The endorsement key certificate to check the report with: the one
/// KEY_INFO names if given, else the other (which then fails as a
/// mismatch, exit 2).
fn endorsement(report: &Report, set: &CertSet) -> Option<Vec<u8>> {
    let (first, second) = if report.signing_key() == SigningKey::Vlek {
        (&set.vlek, &set.vcek)
    } else {
        (&set.vcek, &set.vlek)
    };
    first.clone().or_else(|| second.clone())
}

/// Runs `attest verify`; returns the exit code.
pub fn verify_command(args: &VerifyArgs, out: &mut dyn Write) -> i32 {
    let usage = |out: &mut dyn Write, m: String| {
        let _ = writeln!(out, "error: {m}");
        EXIT_USAGE
    };
    let report_bytes = match std::fs::read(&args.report) {
        Ok(b) => b,
        Err(e) => return usage(out, format!("{}: {e}", args.report.display())),
    };
    let (report_bytes, embedded) = match crate::extended::split(&report_bytes) {
        Ok(Some(e)) => (e.report, e.certs),
        Ok(None) => (&report_bytes[..], None),
        Err(e) => return usage(out, format!("{}: {e}", args.report.display())),
    };
    let report = match Report::parse_any(report_bytes) {
        Ok(r) => r,
        // A report-sized blob with a bad version is a modified report.
        Err(e @ crate::ReportError::Version(_)) => {
            let _ = writeln!(out, "INVALID: {}: {e}", args.report.display());
            return EXIT_INVALID;
        }
        Err(e) => return usage(out, format!("{}: {e}", args.report.display())),
    };
    let set = match gather_certs(args, embedded) {
        Ok(s) => s,
        Err(e) => return usage(out, e),
    };
    let Some(cert) = endorsement(&report, &set) else {
        return usage(
            out,
            "no VCEK or VLEK certificate (--vcek, --vlek, --certs DIR, --cert-table, or a table after the report in its file)".into(),
        );
    };
    let policy = match load_policy(args) {
        Ok(p) => p,
        Err(e) => return usage(out, e),
    };
    let pinned = policy.pins_something();
    let product = match args.product.as_deref() {
        None => None,
        Some(p) => match Product::from_name(p) {
            Some(p) => Some(p),
            None => return usage(out, format!("unknown product {p:?} (milan, genoa, turin)")),
        },
    };
    let result = if report.is_simulated() {
        let (Some(ask), Some(ark)) = (&set.ask, &set.ark) else {
            emit(out, args.json, describe(&report, None), "INVALID", &[
                "SIMULATED report: verifying it needs the operator's chain (--sim-ask, --sim-ark)".into(),
            ], pinned);
            return EXIT_INVALID;
        };
        verify::verify_sim(&report, &cert, ask, ark)
    } else {
        verify::verify_amd(&report, &cert, product)
    };
    match result {
        Err(e) => {
            emit(
                out,
                args.json,
                describe(&report, None),
                "INVALID",
                &[e.to_string()],
                pinned,
            );
            EXIT_INVALID
        }
        Ok(v) => {
            let problems = policy.violations(&report, &v.tcb);
            let (verdict, code) = if problems.is_empty() {
                ("VERIFIED, policy met", EXIT_OK)
            } else {
                ("VERIFIED, POLICY NOT MET", EXIT_POLICY)
            };
            emit(
                out,
                args.json,
                describe(&report, Some(&v)),
                verdict,
                &problems,
                pinned,
            );
            code
        }
    }
}
