//! `bubblectl`: the command-line client of `bubbled`.
//!
//! Tables for people, `--json` for scripts. Exit codes: 0 success, 1 usage,
//! I/O or broker error (the gRPC status is printed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use bubble_proto::v1::broker_client::BrokerClient;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tonic::transport::Channel;

use crate::client;

/// Command-line options of `bubblectl`.
#[derive(Debug, Parser)]
#[command(
    name = "bubblectl",
    version,
    about = "Manage bubbles (child KVM VMs) through bubbled"
)]
pub struct Opts {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to reach the broker.
#[derive(Debug, Args)]
struct Conn {
    /// Broker Unix socket.
    #[arg(
        long,
        global = true,
        env = "BUBBLED_SOCKET",
        default_value = "/var/lib/bubbled/bubbled.sock"
    )]
    socket: PathBuf,
    /// Use mutual TLS to this URL instead (e.g. https://localhost:7443).
    #[arg(long, global = true, env = "BUBBLED_ENDPOINT")]
    endpoint: Option<String>,
    /// PKI directory (from `bubblectl pki init`) for --endpoint.
    #[arg(long, global = true, env = "BUBBLED_PKI")]
    pki: Option<PathBuf>,
    /// Parent name whose certificate to present with --endpoint.
    #[arg(long, global = true, env = "BUBBLED_PARENT")]
    parent: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a bubble and wait until it is READY.
    Create {
        /// Guest memory in MiB (4-4096).
        #[arg(long, default_value_t = 64)]
        memory_mib: u32,
        /// Idempotency key: retrying with the same key never makes two bubbles.
        #[arg(long, default_value = "")]
        request_id: String,
        /// Guest image ("shim").
        #[arg(long, default_value = "shim")]
        image: String,
    },
    /// Take a pre-booted bubble from a warm pool.
    Attach {
        /// Warm-pool profile.
        profile: String,
        /// On a miss, wait up to this long for the pool before booting one.
        #[arg(long, default_value_t = 0)]
        wait_ms: u32,
        /// Idempotency key.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Freeze a bubble to the encrypted store.
    Suspend {
        /// Bubble id.
        bubble: String,
        /// A file holding a 32-byte key-encryption key that you keep (64 hex
        /// digits or 32 raw bytes, mode 0600; `-` reads standard input;
        /// default: $BUBBLECTL_KEK if set). Restore then needs it.
        #[arg(long)]
        kek_file: Option<PathBuf>,
    },
    /// Resume a suspended bubble from its frozen copy.
    Restore {
        /// Bubble id.
        bubble: String,
        /// The key given at suspend, if any: a 0600 file, `-` for standard
        /// input (default: $BUBBLECTL_KEK if set).
        #[arg(long)]
        kek_file: Option<PathBuf>,
        /// For a bubble suspended by another broker sharing the store: the
        /// generation to restore.
        #[arg(long, default_value_t = 0)]
        generation: u64,
    },
    /// Frozen (suspended) bubbles.
    #[command(subcommand)]
    Frozen(FrozenCmd),
    /// Show a bubble's metered usage, signed by the broker.
    Usage {
        /// Bubble id.
        bubble: String,
        /// Require the report to be signed by this broker key (hex).
        #[arg(long)]
        broker_key: Option<String>,
    },
    /// Run a bounded load test against a broker over mutual TLS.
    Load {
        /// Parents (each gets a certificate load-<i> in --pki).
        #[arg(long, default_value_t = 8)]
        parents: usize,
        /// Churn rounds per parent (create or attach, calls, delete).
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Calls per churn round.
        #[arg(long, default_value_t = 5)]
        calls_per_round: usize,
        /// Steady calls per parent on one long-lived bubble.
        #[arg(long, default_value_t = 200)]
        steady_calls: usize,
        /// Attach from this warm-pool profile instead of creating.
        #[arg(long)]
        profile: Option<String>,
        /// Guest memory of created bubbles.
        #[arg(long, default_value_t = 16)]
        memory_mib: u32,
    },
    /// List your bubbles.
    List {
        /// Include deleted bubbles.
        #[arg(long)]
        all: bool,
    },
    /// Show one bubble.
    Describe {
        /// Bubble id.
        bubble: String,
    },
    /// Call an operation in a bubble.
    Call {
        /// Bubble id.
        bubble: String,
        /// Operation ("echo", "sha256").
        op: String,
        /// Input as text.
        #[arg(long, conflicts_with_all = ["input_hex", "input_file"])]
        input: Option<String>,
        /// Input as hex.
        #[arg(long, conflicts_with = "input_file")]
        input_hex: Option<String>,
        /// Input from a file.
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Deadline in milliseconds (0: broker default).
        #[arg(long, default_value_t = 0)]
        deadline_ms: u32,
    },
    /// Delete a bubble.
    Delete {
        /// Bubble id.
        bubble: String,
    },
    /// Stream state changes of your bubbles until interrupted.
    Watch {
        /// Only this bubble.
        bubble: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Development PKI for mutual TLS.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Attestation: fetch a bubble's report, verify reports offline.
    #[command(subcommand)]
    Attest(AttestCmd),
    /// Print the launch measurement a bubble booted from an image reports,
    /// computed offline by the VMM's own loader (no KVM needed).
    Measure {
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
    },
    /// Run the demo: a broker on embedded defaults in a temp dir, a few
    /// bubbles created, called and deleted, and a timing table.
    Demo {
        /// Number of bubbles.
        #[arg(long, default_value_t = 4)]
        bubbles: usize,
        /// Calls per bubble.
        #[arg(long, default_value_t = 200)]
        calls: usize,
    },
}

#[derive(Debug, Subcommand)]
enum FrozenCmd {
    /// List your suspended bubbles.
    List,
}

// Parsed once per process from argv: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum AttestCmd {
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

#[derive(Debug, Subcommand)]
enum PkiCmd {
    /// Create a CA, a server certificate and parent certificates.
    Init {
        /// Output directory.
        dir: PathBuf,
        /// Parent names (each gets parents/NAME.pem and .key).
        #[arg(long, value_delimiter = ',', default_value = "parent-a,parent-b")]
        parents: Vec<String>,
    },
    /// Issue a certificate for one more parent.
    AddParent {
        /// PKI directory.
        dir: PathBuf,
        /// Parent name.
        name: String,
    },
}

/// Entry point of the `bubblectl` binary.
pub fn main() -> ExitCode {
    let opts = Opts::parse();
    // The demo's client is one parent making one call at a time: a
    // current-thread runtime (its broker has threads of its own).
    let rt = match opts.cmd {
        Cmd::Demo { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bubblectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bubblectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(c: &Conn) -> anyhow::Result<BrokerClient<Channel>> {
    match &c.endpoint {
        Some(url) => {
            let pki = c.pki.as_ref().context("--endpoint needs --pki DIR")?;
            let parent = c
                .parent
                .as_ref()
                .context("--endpoint needs --parent NAME")?;
            let (cert, key) = crate::pki::parent_files(pki, parent);
            Ok(client::connect_tls(url, &pki.join("ca.pem"), &cert, &key).await?)
        }
        None => Ok(client::connect_unix(&c.socket).await?),
    }
}

/// Name of a proto state for people.
pub fn state_label(state: i32) -> &'static str {
    match pb::BubbleState::try_from(state) {
        Ok(pb::BubbleState::Booting) => "BOOTING",
        Ok(pb::BubbleState::Ready) => "READY",
        Ok(pb::BubbleState::Busy) => "BUSY",
        Ok(pb::BubbleState::Suspended) => "SUSPENDED",
        Ok(pb::BubbleState::Failed) => "FAILED",
        Ok(pb::BubbleState::Deleted) => "DELETED",
        _ => "UNKNOWN",
    }
}

fn bubble_json(b: &pb::Bubble) -> serde_json::Value {
    json!({
        "bubble_id": b.bubble_id, "owner": b.owner, "state": state_label(b.state),
        "failure_reason": b.failure_reason, "memory_mib": b.memory_mib, "vcpus": b.vcpus,
        "image": b.image, "client_request_id": b.client_request_id,
        "created_at_ms": b.created_at_ms, "boot_us": b.boot_us, "vmm_pid": b.vmm_pid,
        "calls": b.calls, "generation": b.generation,
    })
}

fn print_table(bubbles: &[pb::Bubble]) {
    println!(
        "{:<34}  {:<9}  {:>7}  {:>9}  {:>7}  {:>7}  REASON",
        "BUBBLE", "STATE", "MEM_MIB", "BOOT_MS", "CALLS", "PID"
    );
    for b in bubbles {
        println!(
            "{:<34}  {:<9}  {:>7}  {:>9.2}  {:>7}  {:>7}  {}",
            b.bubble_id,
            state_label(b.state),
            b.memory_mib,
            b.boot_us as f64 / 1000.0,
            b.calls,
            b.vmm_pid,
            b.failure_reason
        );
    }
}

fn print_bubble(b: &pb::Bubble, json_out: bool) {
    if json_out {
        println!("{}", bubble_json(b));
    } else {
        print_table(std::slice::from_ref(b));
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn printable(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| s.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key-encryption key given as hex on the command line (none: empty).
fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s = s.trim();
    anyhow::ensure!(
        s.len().is_multiple_of(2),
        "hex input has an odd number of digits"
    );
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .context("hex input has a non-hex digit")
        })
        .collect()
}

async fn run(opts: Opts) -> anyhow::Result<ExitCode> {
    let j = opts.json;
    match opts.cmd {
        Cmd::Pki(PkiCmd::Init { dir, parents }) => {
            crate::pki::init(&dir, &parents)?;
            if j {
                println!("{}", json!({"dir": dir, "parents": parents}));
            } else {
                println!(
                    "PKI written to {} (parents: {})",
                    dir.display(),
                    parents.join(", ")
                );
            }
        }
        Cmd::Pki(PkiCmd::AddParent { dir, name }) => {
            crate::pki::add_parent(&dir, &name)?;
            println!("issued parents/{name}.pem in {}", dir.display());
        }
        Cmd::Attest(AttestCmd::Verify {
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
        }) => {
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
            return Ok(ExitCode::from(code as u8));
        }
        Cmd::Attest(AttestCmd::Get { bubble, nonce, out }) => {
            let nonce = match nonce {
                Some(h) => unhex(&h)?,
                None => {
                    let mut n = vec![0u8; 32];
                    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                    n
                }
            };
            let mut c = connect(&opts.conn).await?;
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
        }
        Cmd::Measure {
            image,
            explain,
            memory_mib,
            max_payload,
        } => crate::attest::print_measure(&image, explain, memory_mib, max_payload, j)?,
        Cmd::Demo { bubbles, calls } => {
            crate::demo::run(bubbles, calls).await?;
        }
        Cmd::Create {
            memory_mib,
            request_id,
            image,
        } => {
            let mut c = connect(&opts.conn).await?;
            let b = c
                .create_bubble(pb::CreateBubbleRequest {
                    idle: None,
                    policy: None,
                    client_request_id: request_id,
                    memory_mib,
                    vcpus: 1,
                    image,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
            if b.state == pb::BubbleState::Failed as i32 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Attach {
            profile,
            wait_ms,
            request_id,
        } => {
            let mut c = connect(&opts.conn).await?;
            let b = c
                .attach_bubble(pb::AttachBubbleRequest {
                    profile,
                    wait_ms,
                    idle: None,
                    client_request_id: request_id,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
        }
        Cmd::Usage { bubble, broker_key } => {
            let mut c = connect(&opts.conn).await?;
            let r = c
                .get_usage(pb::BubbleRef { bubble_id: bubble })
                .await
                .map_err(status_err)?
                .into_inner();
            let key: [u8; 32] = match &broker_key {
                Some(h) => unhex(h)?
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("--broker-key must be 32 bytes of hex"))?,
                None => r
                    .broker_public_key
                    .clone()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("report carries a malformed broker key"))?,
            };
            crate::obs::usage::verify(&r, &key)
                .map_err(|e| anyhow::anyhow!("usage report does not verify: {e}"))?;
            let u = r.usage.unwrap_or_default();
            if j {
                let mut v: serde_json::Value = serde_json::from_slice(&r.signed_json)?;
                v["signature_hex"] = json!(hex(&r.signature));
                v["broker_key_hex"] = json!(hex(&key));
                v["signature_valid"] = json!(true);
                println!("{v}");
            } else {
                println!("bubble           {}", u.bubble_id);
                println!("vcpu time        {:.3} ms", u.vcpu_us as f64 / 1e3);
                println!("memory           {:.1} MiB-seconds", u.memory_mib_seconds);
                println!("calls            {}", u.calls);
                println!("bytes in / out   {} / {}", u.bytes_in, u.bytes_out);
                println!(
                    "signature        valid (broker key {}{})",
                    hex(&key),
                    if broker_key.is_some() {
                        ", pinned"
                    } else {
                        ", as reported: pin it with --broker-key"
                    }
                );
            }
        }
        Cmd::Load {
            parents,
            rounds,
            calls_per_round,
            steady_calls,
            profile,
            memory_mib,
        } => {
            let endpoint = opts
                .conn
                .endpoint
                .clone()
                .context("load needs --endpoint (mutual TLS, one certificate per parent)")?;
            let pki = opts.conn.pki.clone().context("load needs --pki DIR")?;
            let spec = crate::load::LoadSpec {
                endpoint,
                pki,
                parents,
                rounds,
                calls_per_round,
                steady_calls,
                profile,
                memory_mib,
            };
            eprintln!(
                "load: {parents} parents x ({rounds} churn rounds + {steady_calls} steady calls)..."
            );
            let rep = crate::load::run(spec).await.map_err(anyhow::Error::msg)?;
            if j {
                println!("{}", rep.to_json());
            } else {
                rep.print();
            }
            if rep.error_count() > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Suspend { bubble, kek_file } => {
            let kek = crate::kek_input::read_kek(kek_file.as_deref())?;
            let mut c = connect(&opts.conn).await?;
            eprintln!("suspending {bubble}...");
            let b = c
                .suspend_bubble(pb::SuspendBubbleRequest {
                    bubble_id: bubble,
                    kek: kek.to_vec(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
        }
        Cmd::Restore {
            bubble,
            kek_file,
            generation,
        } => {
            let kek = crate::kek_input::read_kek(kek_file.as_deref())?;
            let mut c = connect(&opts.conn).await?;
            eprintln!("verifying and restoring {bubble}...");
            let b = c
                .restore_bubble(pb::RestoreBubbleRequest {
                    bubble_id: bubble,
                    kek: kek.to_vec(),
                    generation,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
        }
        Cmd::Frozen(FrozenCmd::List) => {
            let mut c = connect(&opts.conn).await?;
            let r = c
                .list_bubbles(pb::ListBubblesRequest::default())
                .await
                .map_err(status_err)?
                .into_inner();
            let frozen: Vec<pb::Bubble> = r
                .bubbles
                .into_iter()
                .filter(|b| b.state == pb::BubbleState::Suspended as i32)
                .collect();
            if j {
                let v: Vec<_> = frozen.iter().map(bubble_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                print_table(&frozen);
            }
        }
        Cmd::List { all } => {
            let mut c = connect(&opts.conn).await?;
            let r = c
                .list_bubbles(pb::ListBubblesRequest {
                    include_deleted: all,
                    ..Default::default()
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                let v: Vec<_> = r.bubbles.iter().map(bubble_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                print_table(&r.bubbles);
            }
        }
        Cmd::Describe { bubble } => {
            let mut c = connect(&opts.conn).await?;
            let b = c
                .describe_bubble(pb::BubbleRef { bubble_id: bubble })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
        }
        Cmd::Call {
            bubble,
            op,
            input,
            input_hex,
            input_file,
            deadline_ms,
        } => {
            let input = match (input, input_hex, input_file) {
                (Some(s), _, _) => s.into_bytes(),
                (_, Some(h), _) => unhex(&h)?,
                (_, _, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                _ => Vec::new(),
            };
            let mut c = connect(&opts.conn).await?;
            let r = c
                .call(pb::CallRequest {
                    bubble_id: bubble,
                    op,
                    input,
                    deadline_ms,
                    ..Default::default()
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!(
                    "{}",
                    json!({"output_hex": hex(&r.output), "output_len": r.output.len(), "vmm_us": r.vmm_us})
                );
            } else {
                match printable(&r.output) {
                    Some(s) => println!("{s}"),
                    None => println!("{}", hex(&r.output)),
                }
            }
        }
        Cmd::Delete { bubble } => {
            let mut c = connect(&opts.conn).await?;
            let b = c
                .delete_bubble(pb::BubbleRef { bubble_id: bubble })
                .await
                .map_err(status_err)?
                .into_inner();
            print_bubble(&b, j);
        }
        Cmd::Watch { bubble, count } => {
            let mut c = connect(&opts.conn).await?;
            let mut s = c
                .watch_events(pb::WatchEventsRequest {
                    bubble_id: bubble.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut seen = 0u64;
            while let Some(ev) = s.message().await.map_err(status_err)? {
                if j {
                    println!(
                        "{}",
                        json!({"bubble_id": ev.bubble_id, "state": state_label(ev.state), "reason": ev.reason, "at_ms": ev.at_ms})
                    );
                } else {
                    println!(
                        "{}  {:<34}  {:<9}  {}",
                        ev.at_ms,
                        ev.bubble_id,
                        state_label(ev.state),
                        ev.reason
                    );
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(unhex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(unhex("0").is_err());
        assert!(unhex("zz").is_err());
        assert_eq!(hex(&[1, 0xab]), "01ab");
    }

    #[test]
    fn cli_parses() {
        Opts::try_parse_from(["bubblectl", "--json", "create", "--memory-mib", "16"]).unwrap();
        Opts::try_parse_from(["bubblectl", "call", "b-1", "echo", "--input", "hi"]).unwrap();
        assert!(Opts::try_parse_from([
            "bubblectl",
            "call",
            "b-1",
            "echo",
            "--input",
            "a",
            "--input-hex",
            "00"
        ])
        .is_err());
    }
}
