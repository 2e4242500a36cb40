//! The verifier against real AMD hardware reports (offline), mutated
//! copies, and the simulated PSP.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bubble_attestation::cli::{verify_command, VerifyArgs, EXIT_INVALID, EXIT_OK, EXIT_POLICY};
use bubble_attestation::{Report, ReportRequest, SimPsp, TeeBackend};

fn testdata(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/snp-real")
        .join(name);
    assert!(
        p.exists(),
        "missing test data {} (shared/ must sit beside the repo)",
        p.display()
    );
    p
}

fn run(args: &VerifyArgs) -> (i32, String) {
    let mut out = Vec::new();
    let code = verify_command(args, &mut out);
    (code, String::from_utf8(out).unwrap())
}

fn args(report: PathBuf, vcek: PathBuf) -> VerifyArgs {
    VerifyArgs {
        report,
        vcek: Some(vcek),
        ..Default::default()
    }
}

/// Every byte of the report (signed region, signature, its zero padding
/// and reserved tail), one bit flipped at a time, is refused with exit
/// code 2.
fn mutations_are_refused(report: &[u8], vcek: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.bin");
    let mut checked = 0;
    for i in 0..report.len() {
        let mut m = report.to_vec();
        m[i] ^= 1 << (i % 8);
        std::fs::write(&p, &m).unwrap();
        let (code, out) = run(&args(p.clone(), vcek.to_path_buf()));
        assert_eq!(
            code, EXIT_INVALID,
            "byte {i:#x} flipped was not refused: {out}"
        );
        checked += 1;
    }
    assert_eq!(checked, 1184);
}

#[test]
fn gcp_milan_report_verifies_and_every_mutation_fails() {
    let (code, out) = run(&args(
        testdata("gcp-milan-report.bin"),
        testdata("gcp-milan-vcek.pem"),
    ));
    assert_eq!(code, EXIT_OK, "{out}");
    assert!(
        out.contains("AMD SEV-SNP") && out.contains("Milan"),
        "{out}"
    );
    let raw = std::fs::read(testdata("gcp-milan-report.bin")).unwrap();
    mutations_are_refused(&raw, &testdata("gcp-milan-vcek.pem"));
}

#[test]
fn sev_crate_milan_report_verifies_from_hex_and_every_mutation_fails() {
    let mut a = args(
        testdata("sevcrate-milan-report.hex"),
        testdata("sevcrate-milan-vcek.der"),
    );
    a.json = true;
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_OK, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tee"], "AMD SEV-SNP");
    assert_eq!(v["product"], "Milan");
    let raw = Report::parse_any(&std::fs::read(testdata("sevcrate-milan-report.hex")).unwrap())
        .unwrap()
        .raw;
    mutations_are_refused(&raw, &testdata("sevcrate-milan-vcek.der"));
}

#[test]
fn wrong_vcek_or_product_is_refused() {
    let (code, out) = run(&args(
        testdata("gcp-milan-report.bin"),
        testdata("sevcrate-turin-vcek.der"),
    ));
    assert_eq!(code, EXIT_INVALID, "{out}");
    let (code, _) = run(&args(
        testdata("gcp-milan-report.bin"),
        testdata("sevcrate-milan-vcek.der"),
    ));
    assert_eq!(code, EXIT_INVALID);
    let mut a = args(
        testdata("gcp-milan-report.bin"),
        testdata("gcp-milan-vcek.pem"),
    );
    a.product = Some("genoa".into());
    assert_eq!(run(&a).0, EXIT_INVALID);
    a.product = Some("pentium".into());
    assert_eq!(run(&a).0, 1);
    let a = args(
        PathBuf::from("/nonexistent"),
        testdata("gcp-milan-vcek.pem"),
    );
    assert_eq!(run(&a).0, 1);
}

#[test]
fn policies_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    let mut a = args(
        testdata("gcp-milan-report.bin"),
        testdata("gcp-milan-vcek.pem"),
    );
    a.policy = Some(pol.clone());
    std::fs::write(&pol, "allowed_measurements = [\"00\"]\n").unwrap();
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_POLICY, "{out}");
    assert!(out.contains("not an allowed measurement"));
    std::fs::write(
        &pol,
        "[min_tcb]\nbootloader = 255\ntee = 0\nsnp = 0\nmicrocode = 0\n",
    )
    .unwrap();
    assert_eq!(run(&a).0, EXIT_POLICY);
    std::fs::write(&pol, "expected_report_data = \"ff\"\n").unwrap();
    assert_eq!(run(&a).0, EXIT_POLICY);
    std::fs::write(&pol, "no_such_key = 1\n").unwrap();
    assert_eq!(run(&a).0, 1);
    // JSON form of the same keys.
    // A policy file must pin a measurement or say it accepts any.
    std::fs::write(&pol, r#"{"allow_debug": false, "max_vmpl": 0}"#).unwrap();
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_POLICY, "{out}");
    assert!(out.contains("not pinned"), "{out}");
    std::fs::write(
        &pol,
        r#"{"allow_debug": false, "max_vmpl": 0, "allow_any_measurement": true}"#,
    )
    .unwrap();
    assert_eq!(run(&a).0, EXIT_OK);
    std::fs::write(&pol, r#"{"allowed_measurements": ["00"]}"#).unwrap();
    assert_eq!(run(&a).0, EXIT_POLICY);
}

#[test]
fn simulated_reports_say_so_and_need_allow_sim() {
    let dir = tempfile::tempdir().unwrap();
    let psp = SimPsp::load_or_create(&dir.path().join("psp")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for k in ["ark.key", "ask.key", "vcek.key"] {
            let m = std::fs::metadata(dir.path().join("psp").join(k))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{k}");
        }
    }
    let rd = [0x42u8; 64];
    let report = psp
        .report(&ReportRequest {
            report_data: rd,
            measurement: [7u8; 48],
            host_data: [0u8; 32],
        })
        .unwrap();
    let chain = psp.cert_chain().unwrap();
    // Reloading keeps the same chain.
    let again = SimPsp::load_or_create(&dir.path().join("psp")).unwrap();
    assert_eq!(again.cert_chain().unwrap().ark, chain.ark);
    let w = |n: &str, b: &[u8]| {
        let p = dir.path().join(n);
        std::fs::write(&p, b).unwrap();
        p
    };
    let rp = w("r.bin", &report);
    let mut a = args(rp.clone(), w("vcek.der", &chain.vcek));
    // No trust anchor given: cannot verify.
    assert_eq!(run(&a).0, EXIT_INVALID);
    a.sim_ask = Some(w("ask.der", &chain.ask));
    a.sim_ark = Some(w("ark.der", &chain.ark));
    let (code, out) = run(&a);
    assert_eq!(
        code, EXIT_POLICY,
        "default policy refuses simulation: {out}"
    );
    assert!(out.contains("SIMULATED"), "{out}");
    let pol = w(
        "p.toml",
        format!(
            "allow_sim = true\nallow_any_measurement = true\nexpected_report_data = \"{}\"\n",
            hex_of(&rd)
        )
        .as_bytes(),
    );
    a.policy = Some(pol);
    let (code, out) = run(&a);
    assert_eq!(code, EXIT_OK, "{out}");
    assert!(out.contains("SIMULATED"));
    // Another operator's ARK does not anchor this chain.
    let other = SimPsp::load_or_create(&dir.path().join("other")).unwrap();
    a.sim_ark = Some(w("other-ark.der", &other.cert_chain().unwrap().ark));
    assert_eq!(run(&a).0, EXIT_INVALID);
    a.sim_ark = Some(dir.path().join("ark.der"));
    // Mutations of a sim report are refused too.
    for i in [0usize, 0x50, 0x90, 0x1A0, 0x29F, 0x2A0, 0x2A0 + 72] {
        let mut m = report.clone();
        m[i] ^= 0x80;
        std::fs::write(&rp, &m).unwrap();
        assert_eq!(run(&a).0, EXIT_INVALID, "byte {i:#x}");
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn guest_policy_and_vmpl_rules_are_enforced_on_signed_reports() {
    use bubble_attestation::SimLaunch;
    let dir = tempfile::tempdir().unwrap();
    let psp = SimPsp::load_or_create(&dir.path().join("psp")).unwrap();
    let chain = psp.cert_chain().unwrap();
    let w = |n: &str, b: &[u8]| {
        let p = dir.path().join(n);
        std::fs::write(&p, b).unwrap();
        p
    };
    let req = ReportRequest {
        report_data: [1u8; 64],
        measurement: [2u8; 48],
        host_data: [3u8; 32],
    };
    let mut a = args(dir.path().join("r.bin"), w("vcek.der", &chain.vcek));
    a.sim_ask = Some(w("ask.der", &chain.ask));
    a.sim_ark = Some(w("ark.der", &chain.ark));
    a.json = true;
    let smt = 1u64 << 16;
    let ma = 1u64 << 18;
    let debug = 1u64 << 19;
    // (launch, extra policy lines, expected code, expected problem text)
    let cases: [(SimLaunch, &str, i32, &str); 7] = [
        (SimLaunch::default(), "", EXIT_OK, ""),
        (
            SimLaunch {
                vmpl: 0,
                guest_policy: debug | (1 << 17),
            },
            "",
            EXIT_POLICY,
            "debugging",
        ),
        (
            SimLaunch {
                vmpl: 0,
                guest_policy: debug | (1 << 17),
            },
            "allow_debug = true",
            EXIT_OK,
            "",
        ),
        (
            SimLaunch {
                vmpl: 2,
                guest_policy: 1 << 17,
            },
            "max_vmpl = 1",
            EXIT_POLICY,
            "VMPL 2",
        ),
        (
            SimLaunch {
                vmpl: 0,
                guest_policy: smt | (1 << 17),
            },
            "allow_smt = false",
            EXIT_POLICY,
            "SMT",
        ),
        (
            SimLaunch {
                vmpl: 0,
                guest_policy: ma | (1 << 17),
            },
            "",
            EXIT_POLICY,
            "migration agent",
        ),
        (
            SimLaunch {
                vmpl: 0,
                guest_policy: ma | (1 << 17),
            },
            "allow_migration_agent = true",
            EXIT_OK,
            "",
        ),
    ];
    for (i, (launch, extra, want, text)) in cases.iter().enumerate() {
        std::fs::write(&a.report, psp.report_with(&req, launch).unwrap()).unwrap();
        a.policy = Some(w(
            "p.toml",
            format!("allow_sim = true\nallow_any_measurement = true\n{extra}\n").as_bytes(),
        ));
        let (code, out) = run(&a);
        assert_eq!(code, *want, "case {i}: {out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["simulated"], true);
        assert_eq!(v["vmpl"], launch.vmpl);
        assert!(out.contains(text), "case {i}: {out}");
    }
}

#[test]
fn turin_vcek_chains_to_the_turin_roots_and_carries_fmc() {
    use bubble_attestation::verify::{check_amd_chain, product_of, vcek_tcb};
    let turin = std::fs::read(testdata("sevcrate-turin-vcek.der")).unwrap();
    assert_eq!(product_of(&turin), Some(bubble_attestation::Product::Turin));
    let (p, key) = check_amd_chain(&turin, None).unwrap();
    assert_eq!(p, bubble_attestation::Product::Turin);
    assert_eq!(key.len(), 97);
    assert!(check_amd_chain(&turin, Some(bubble_attestation::Product::Milan)).is_err());
    assert!(check_amd_chain(&turin, Some(bubble_attestation::Product::Genoa)).is_err());
    let t = vcek_tcb(&turin, true).unwrap();
    assert_eq!((t.fmc, t.bootloader, t.microcode), (Some(0), 0, 9));
    // Milan VCEKs carry no FMC component.
    let milan = std::fs::read(testdata("sevcrate-milan-vcek.der")).unwrap();
    assert!(vcek_tcb(&milan, true).is_err());
    let t = vcek_tcb(&milan, false).unwrap();
    assert_eq!((t.bootloader, t.tee, t.snp, t.microcode), (3, 0, 8, 0x73));
}
