//! End to end on real KVM: attest a bubble with a nonce, verify under a
//! policy, provision a credential, prove the bubble holds it; refusals for
//! a wrong nonce, a wrong measurement, a wrong security policy, a wrong
//! HOST_DATA and a sim report under the default policy; `bubblectl measure`
//! and `attest get`/`verify` agree.
//!
//! Needs a broker that fills HOST_DATA with `host_data(bubble id, owner)`.

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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
