//! End to end on real KVM: attest a bubble with a nonce, verify under a
//! policy, provision a credential, prove the bubble holds it; refusals for
//! a wrong nonce, a wrong measurement, a wrong security policy, a wrong
//! HOST_DATA and a sim report under the default policy; `bubblectl measure`
//! and `attest get`/`verify` agree; the MEASUREMENT a running bubble
//! reports (computed by its VMM) equals the page list folded by
//! `sev-snp-measure`, before and after a restore.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bubble_client::{verify_attestation, ClientError, Expectations, Parent};
use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;
use hmac::{Hmac, Mac};

/// The broker's name for this process on its Unix socket.
fn owner() -> String {
    use std::os::unix::fs::MetadataExt;
    format!("uid:{}", std::fs::metadata("/proc/self").unwrap().uid())
}

fn unhex48(s: &str) -> [u8; 48] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attest_provision_and_prove() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let ark = std::fs::read(dir.path().join("psp/ark.der")).unwrap();
    let parent = Parent::connect_unix(&broker.socket).await.unwrap();
    let mut bubble = parent.create(16).await.unwrap();

    // The measurement bubblectl computes offline equals the reported one.
    let out = std::process::Command::new(ctl_bin())
        .args(["measure", "--memory-mib", "16"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let offline = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let id = bubble.id().to_string();
    let right = Expectations::new(unhex48(&offline), &id, &owner()).allow_sim();
    // Default appraisal: a simulated report is refused.
    let no_sim = Expectations::new(unhex48(&offline), &id, &owner());
    let e = bubble.attest(&no_sim, Some(&ark)).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Attestation(m) if m.contains("SIMULATED")),
        "{e}"
    );
    // Another measurement is refused.
    let wrong = Expectations::new([0u8; 48], &id, &owner()).allow_sim();
    let e = bubble.attest(&wrong, Some(&ark)).await.unwrap_err();
    assert!(e.to_string().contains("not an allowed measurement"), "{e}");
    // No measurement at all is refused unless allowed explicitly.
    let mut unpinned = right.clone();
    unpinned.appraisal.allowed_measurements.clear();
    let e = bubble.attest(&unpinned, Some(&ark)).await.unwrap_err();
    assert!(e.to_string().contains("not pinned"), "{e}");
    // Another owner's (or bubble's) HOST_DATA is refused.
    let other_owner = Expectations::new(unhex48(&offline), &id, "uid:4242").allow_sim();
    let e = bubble.attest(&other_owner, Some(&ark)).await.unwrap_err();
    assert!(e.to_string().contains("HOST_DATA"), "{e}");
    // Another security policy is refused.
    let other_policy = right
        .clone()
        .with_security_policy(bubble_attestation::SecurityPolicy {
            credential_rate: None,
            fuel_per_call: 1,
            ..Default::default()
        });
    let e = bubble.attest(&other_policy, Some(&ark)).await.unwrap_err();
    assert!(e.to_string().contains("security policy"), "{e}");
    // Unexpected portions are refused.
    let mut other_portions = right.clone();
    other_portions.portions = vec![("payments".into(), vec![0u8; 48])];
    let e = bubble
        .attest(&other_portions, Some(&ark))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("portions"), "{e}");
    // After all these refusals the client still trusts no keys.
    assert!(bubble.keys().is_none());
    assert!(matches!(
        bubble.provision("api_key", b"x").await,
        Err(ClientError::NotAttested)
    ));
    // Everything as expected: verified.
    let att = bubble.attest(&right, Some(&ark)).await.unwrap();
    assert!(att.simulated);
    assert_eq!(hex(&att.measurement), offline);
    assert_eq!(att.host_data, bubble_attestation::host_data(&id, &owner()));
    // Any measurement, when written explicitly.
    unpinned.appraisal.allow_any_measurement = true;
    bubble.attest(&unpinned, Some(&ark)).await.unwrap();

    // A report for one nonce does not verify for another.
    let mut c = broker.client().await;
    let a = c
        .get_attestation(pb::GetAttestationRequest {
            bubble_id: bubble.id().to_string(),
            nonce: vec![1u8; 32],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verify_attestation(&a, &[1u8; 32], &right, Some(&ark)).is_ok());
    let e = verify_attestation(&a, &[2u8; 32], &right, Some(&ark)).unwrap_err();
    assert!(e.to_string().contains("REPORT_DATA"), "{e}");
    // Substituted keys are caught by the binding.
    let mut swapped = a.clone();
    swapped.kem_public_key = vec![9u8; 32];
    assert!(verify_attestation(&swapped, &[1u8; 32], &right, Some(&ark)).is_err());
    // Bad nonce sizes are refused by the broker.
    let e = c
        .get_attestation(pb::GetAttestationRequest {
            bubble_id: bubble.id().to_string(),
            nonce: vec![1u8; 8],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Provision with the attested key; a signed call proves possession.
    let secret = b"hmac-credential-0123456789abcdef";
    bubble.provision("api_key", secret).await.unwrap();
    let mut input = vec![7u8];
    input.extend(b"api_key");
    input.extend(b"challenge-42");
    let mac = bubble.call_verified("hmac", &input).await.unwrap();
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(b"challenge-42");
    assert_eq!(mac, m.finalize().into_bytes().to_vec());

    // bubblectl attest get + verify: exit 3 under the default policy
    // (simulated), 0 when simulation and the measurement are allowed.
    let out_dir = dir.path().join("att");
    let ctl = |args: &[&str]| {
        std::process::Command::new(ctl_bin())
            .arg("--socket")
            .arg(&broker.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let o = ctl(&[
        "attest",
        "get",
        bubble.id(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("SIMULATED"));
    let f = |n: &str| out_dir.join(n).to_str().unwrap().to_string();
    let verify = |policy: Option<&str>| {
        let mut a = vec![
            "attest".to_string(),
            "verify".into(),
            "--report".into(),
            f("report.bin"),
            "--vcek".into(),
            f("vcek.der"),
            "--sim-ask".into(),
            f("ask.der"),
            "--sim-ark".into(),
            f("ark.der"),
        ];
        if let Some(p) = policy {
            a.push("--policy".into());
            a.push(p.into());
        }
        let o = std::process::Command::new(ctl_bin())
            .args(&a)
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, text) = verify(None);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("SIMULATED"));
    let pol = dir.path().join("policy.toml");
    std::fs::write(
        &pol,
        format!(
            "allow_sim = true\nallowed_measurements = [\"{offline}\"]\nexpected_host_data = \"{}\"\n",
            hex(&bubble_attestation::host_data(bubble.id(), &owner()))
        ),
    )
    .unwrap();
    let (code, text) = verify(Some(pol.to_str().unwrap()));
    assert_eq!(code, 0, "{text}");
}

/// Whether `sev-snp-measure` (PyPI) can be imported. Under `CI=true` its
/// absence fails the test; elsewhere the test says it is skipped.
fn sev_snp_measure_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import sevsnpmeasure.gctx, sevsnpmeasure.vmsa"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing_dependency(
            "the Python package sev-snp-measure (python3 -m pip install sev-snp-measure)",
        );
    }
    ok
}

/// The shim's launch page list for `memory_mib`, loaded by the VMM's own
/// loader, as input for tests/snp/fold_sev_snp_measure.py: NORMAL pages
/// with their bytes as loaded, runs, and the VMSA by field name (the names
/// of sev-snp-measure's SevEsSaveArea) with our page.
fn page_list_json(memory_mib: u64) -> serde_json::Value {
    use bubble_attestation::measure::{vmsa_page, PageType, VmsaSegment};
    use serde_json::json;
    let loaded = bubble_vmm::load::load(
        bubble_vmm::load::Source::Elf(bubble_vmm::images::SHIM_ELF),
        memory_mib << 20,
        bubbled::config::DEFAULT_MAX_PAYLOAD as u64,
    )
    .unwrap();
    let v = bubble_vmm::launch::vmsa_state(&loaded.vcpu);
    let seg = |s: VmsaSegment| json!([s.selector, s.attrib, s.limit, s.base]);
    let pages: Vec<_> = loaded
        .log
        .ranges()
        .map(|r| match r.page_type {
            PageType::Normal => {
                json!({"type": "normal", "gpa": r.gpa, "data": hex(&loaded.page(r.gpa).unwrap())})
            }
            PageType::Vmsa => json!({"type": "vmsa", "data": hex(&vmsa_page(&v)), "fields": {
                "es": seg(v.es), "cs": seg(v.cs), "ss": seg(v.ss), "ds": seg(v.ds),
                "fs": seg(v.fs), "gs": seg(v.gs), "gdtr": seg(v.gdtr), "ldtr": seg(v.ldtr),
                "idtr": seg(v.idtr), "tr": seg(v.tr), "cpl": v.cpl, "efer": v.efer,
                "cr4": v.cr4, "cr3": v.cr3, "cr0": v.cr0, "dr7": v.dr7, "dr6": v.dr6,
                "rflags": v.rflags, "rip": v.rip, "rsp": v.rsp, "g_pat": v.g_pat,
                "xcr0": v.xcr0, "mxcsr": v.mxcsr, "x87_fcw": v.x87_fcw,
            }}),
            t => json!({"type": t.name(), "gpa": r.gpa, "length": r.len}),
        })
        .collect();
    json!({ "pages": pages })
}

/// MEASUREMENT of a fresh report of `id`.
async fn reported_measurement(c: &mut Client, id: &str) -> String {
    let a = c
        .get_attestation(pb::GetAttestationRequest {
            bubble_id: id.to_string(),
            nonce: vec![3u8; 32],
        })
        .await
        .unwrap()
        .into_inner();
    hex(&bubble_attestation::Report::parse(&a.report)
        .unwrap()
        .measurement)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_digest_matches_sev_snp_measure() {
    if !sev_snp_measure_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), false);
    let mut c = broker.client().await;
    let id = c
        .create_bubble(create_req(16))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;
    let reported = reported_measurement(&mut c, &id).await;

    // sev-snp-measure folds the VMM loader's page list.
    let list = dir.path().join("pages.json");
    std::fs::write(&list, page_list_json(16).to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/snp/fold_sev_snp_measure.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(&list)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs = String::from_utf8(o.stdout).unwrap().trim().to_string();

    // bubblectl measure, and its --explain page list.
    let o = std::process::Command::new(ctl_bin())
        .args(["--json", "measure", "--memory-mib", "16", "--explain"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let offline = j["measurement"].as_str().unwrap().to_string();
    let pages = j["pages"].as_array().unwrap();
    assert_eq!(pages.last().unwrap()["type"], "vmsa");
    assert!(pages.iter().any(|p| p["type"] == "unmeasured"));
    assert!(pages.iter().any(|p| p["type"] == "zero"));

    assert_eq!(reported, theirs, "the running bubble vs sev-snp-measure");
    assert_eq!(offline, theirs, "bubblectl measure vs sev-snp-measure");
    // Another memory size is another measurement (the layout is measured).
    std::fs::write(&list, page_list_json(32).to_string()).unwrap();
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(&list)
        .output()
        .unwrap();
    assert_ne!(String::from_utf8(o.stdout).unwrap().trim(), theirs);

    // Suspended and restored, the bubble still reports its launch digest.
    c.suspend_bubble(pb::SuspendBubbleRequest {
        bubble_id: id.clone(),
        kek: Vec::new(),
    })
    .await
    .unwrap();
    c.restore_bubble(pb::RestoreBubbleRequest {
        bubble_id: id.clone(),
        kek: Vec::new(),
        generation: 0,
    })
    .await
    .unwrap();
    assert_eq!(reported_measurement(&mut c, &id).await, theirs);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
