//! `attest verify`, `attest get`, `measure`.

use std::path::PathBuf;
use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{hex, status_err, unhex};
use super::Conn;

// Parsed once per process from argv: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(super) enum AttestCmd {
    /// Verify a report offline. Exit codes: 0 verified and policy met,
    /// 1 usage or I/O error, 2 signature or chain invalid, 3 policy not met.
    Verify {
        /// Report (1184 raw bytes or hex).
        #[arg(long)]
        report: PathBuf,
        /// VCEK certificate (PEM or DER).
        #[arg(long)]
        vcek: Option<PathBuf>,
        /// VLEK certificate (PEM or DER), for reports whose KEY_INFO names a VLEK.
        #[arg(long)]
        vlek: Option<PathBuf>,
        /// Certificates directory as `snpguest` writes it (ark, ask/asvk,
        /// vcek or vlek; PEM or DER; optionally certs.bin, a certificate table).
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Extended-report certificate table (GUID, offset, length entries).
        #[arg(long)]
        cert_table: Option<PathBuf>,
        /// AMD product (default: the report's CPUID for version 3+, else the
        /// certificate's issuer; refused if it disagrees with CPUID).
        #[arg(long)]
        product: Option<String>,
        /// Expected MEASUREMENT (96 hex digits).
        #[arg(long)]
        expect_measurement: Option<String>,
        /// Expected HOST_DATA (64 hex digits).
        #[arg(long)]
        expect_host_data: Option<String>,
        /// Expected REPORT_DATA (128 hex digits).
        #[arg(long)]
        expect_report_data: Option<String>,
        /// Appraisal policy (TOML).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// For SIMULATED reports: the operator's ASK.
        #[arg(long)]
        sim_ask: Option<PathBuf>,
        /// For SIMULATED reports: the operator's ARK to trust.
        #[arg(long)]
        sim_ark: Option<PathBuf>,
    },
    /// Fetch a bubble's report for a nonce and save report, chain and keys.
    Get {
        /// Bubble id.
        bubble: String,
        /// Nonce as hex (16-64 bytes; default: 32 random bytes).
        #[arg(long)]
        nonce: Option<String>,
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub(super) struct MeasureArgs {
    /// Guest image: "shim" (built in) or an ELF file.
    #[arg(long, default_value = "shim")]
    image: String,
    /// Also print the measured page list (GPA, type, length, SHA-384).
    #[arg(long)]
    explain: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
    /// The broker's payload limit (sizes the mailbox).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_PAYLOAD)]
    max_payload: usize,
}

/// Prints the launch measurement of an image, computed offline.
pub(super) fn measure(a: MeasureArgs, j: bool) -> anyhow::Result<ExitCode> {
    crate::attest::print_measure(&a.image, a.explain, a.memory_mib, a.max_payload, j)?;
    Ok(ExitCode::SUCCESS)
}

/// `verify` exits with the verifier's code; `get` saves a bubble's report.
pub(super) async fn run(conn: &Conn, cmd: AttestCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        AttestCmd::Verify {
            report,
            vcek,
            vlek,
            certs,
            cert_table,
            product,
            expect_measurement,
            expect_host_data,
            expect_report_data,
            policy,
            sim_ask,
            sim_ark,
        } => {
            let args = bubble_attestation::cli::VerifyArgs {
                report,
                vcek,
                vlek,
                certs,
                cert_table,
                product,
                policy,
                sim_ask,
                sim_ark,
                expect_measurement,
                expect_host_data,
                expect_report_data,
                json: j,
            };
            let code = bubble_attestation::cli::verify_command(&args, &mut std::io::stdout());
            Ok(ExitCode::from(code as u8))
        }
        AttestCmd::Get { bubble, nonce, out } => get(conn, bubble, nonce, out, j).await,
    }
}

/// Fetches a bubble's report for a nonce and saves it with its chain and
/// keys in `out`.
async fn get(
    conn: &Conn,
    bubble: String,
    nonce: Option<String>,
    out: PathBuf,
    j: bool,
) -> anyhow::Result<ExitCode> {
    let nonce = match nonce {
        Some(h) => unhex(&h)?,
        None => {
            let mut n = vec![0u8; 32];
            getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
            n
        }
    };
    let mut c = conn.connect().await?;
    let a = c
        .get_attestation(pb::GetAttestationRequest {
            bubble_id: bubble.clone(),
            nonce: nonce.clone(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    std::fs::create_dir_all(&out)?;
    let w = |n: &str, b: &[u8]| std::fs::write(out.join(n), b);
    w("report.bin", &a.report)?;
    w("ark.der", &a.ark_der)?;
    w("ask.der", &a.ask_der)?;
    w("vcek.der", &a.vcek_der)?;
    let info = json!({
        "bubble_id": a.bubble_id, "tee": a.tee, "nonce_hex": hex(&nonce),
        "kem_public_key_hex": hex(&a.kem_public_key), "sig_public_key_hex": hex(&a.sig_public_key),
        "portions_digest_hex": hex(&a.portions_digest), "policy_digest_hex": hex(&a.policy_digest),
        "portions": a.portions.iter().map(|p| json!({"name": p.name, "module_sha384_hex": hex(&p.module_sha384)})).collect::<Vec<_>>(),
        "report_data_binding": "SHA-512(\"bubble-v1\" || u32 LE len(n) || n || kem_pk || sig_pk) with n = nonce || portions_digest || policy_digest",
    });
    w(
        "bubble.json",
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    if j {
        println!("{info}");
    } else {
        println!(
            "saved report.bin, ark.der, ask.der, vcek.der and bubble.json in {}",
            out.display()
        );
        if a.tee == "sim" {
            println!("TEE: SIMULATED (virtual PSP, no hardware protection)");
        }
        println!(
            "portions: {}",
            a.portions
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "verify: bubblectl attest verify --report {0}/report.bin --vcek {0}/vcek.der --sim-ask {0}/ask.der --sim-ark {0}/ark.der --policy POLICY",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
