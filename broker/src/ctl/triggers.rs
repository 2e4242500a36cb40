//! `trigger create|list|delete`, `publish`, `results`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{hex, status_err, write_output, OutputFormat};
use super::Conn;

#[derive(Debug, Subcommand)]
pub(super) enum TriggerCmd {
    /// Register a trigger: events on SUBJECT run FUNCTION of PORTION.
    Create(CreateArgs),
    /// List your triggers.
    List,
    /// Delete one of your triggers (its dispatcher stops).
    Delete {
        /// Trigger id.
        trigger: String,
    },
    /// List a trigger's dead-lettered events.
    DeadLetters {
        /// Trigger id.
        trigger: String,
    },
    /// Put a dead-lettered event back into the trigger's queue.
    Replay {
        /// Trigger id.
        trigger: String,
        /// The event's key.
        key: String,
    },
}

#[derive(Debug, Args)]
pub(super) struct CreateArgs {
    /// Subject (dotted tokens) in your own namespace.
    subject: String,
    /// Portion name.
    portion: String,
    /// Function of the portion.
    function: String,
    /// Run in this bubble of yours (the portion loaded)...
    #[arg(long, conflicts_with_all = ["profile", "module"], required_unless_present = "profile")]
    bubble: Option<String>,
    /// ...or in a bubble attached from this warm pool...
    #[arg(long, requires = "module")]
    profile: Option<String>,
    /// ...with this WebAssembly module (.wasm or .wat) loaded as PORTION.
    #[arg(long)]
    module: Option<PathBuf>,
    /// embedded (default) or nats.
    #[arg(long, default_value = "embedded")]
    source: String,
    /// Events fetched at once (0: 1).
    #[arg(long, default_value_t = 0)]
    batch_size: u32,
    /// Events in flight at once (0: 1).
    #[arg(long, default_value_t = 0)]
    max_concurrency: u32,
    /// Deliveries before an event is dead-lettered (0: 5).
    #[arg(long, default_value_t = 0)]
    max_deliver: u32,
    /// The security policy its events run under (TOML, as for `create`):
    /// a pool trigger attaches with it; a named bubble's must be equal.
    #[arg(long)]
    policy_file: Option<PathBuf>,
    /// Most events pending at once; a publish beyond it is refused
    /// (0: the broker's default, also its ceiling; on NATS the stream's
    /// limit, shared by every broker on it).
    #[arg(long, default_value_t = 0)]
    max_pending: u64,
    /// Seal every result to the X25519 key in this file (32 bytes or 64
    /// hex digits, 0600): the broker stores and relays ciphertext only;
    /// `results --key-file` opens it.
    #[arg(long)]
    seal_key_file: Option<PathBuf>,
    /// Print the trigger id alone.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// Subject (your own namespace).
    subject: String,
    /// Idempotency key (default: a fresh random one).
    #[arg(long)]
    key: Option<String>,
    /// Payload from this file (default: standard input).
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct ResultsArgs {
    /// Trigger id.
    trigger: String,
    /// The event's key.
    key: String,
    /// How to print the output: text, hex, or raw bytes.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Open a sealed result with the key in this file (the trigger's
    /// `--seal-key-file`).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct AwaitResultArgs {
    /// The key the direct call's portion awaited.
    key: String,
    /// How to print the output: text, hex, or raw bytes.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// The X25519 key pair in a private key file (32 bytes or 64 hex digits).
fn seal_key(p: &std::path::Path) -> anyhow::Result<bubble_keys::KemKeyPair> {
    let raw = crate::kek_input::read_private_file(p, "sealing key")?;
    let bytes: zeroize::Zeroizing<Vec<u8>> = if raw.len() == 32 {
        zeroize::Zeroizing::new(raw.to_vec())
    } else {
        zeroize::Zeroizing::new(
            ::hex::decode(raw.trim_ascii())
                .ok()
                .filter(|b| b.len() == 32)
                .context("a sealing key file holds 32 bytes or 64 hex digits")?,
        )
    };
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&bytes);
    bubble_keys::KemKeyPair::from_secret_bytes(&secret).context("not an X25519 private key")
}

fn trigger_json(t: &pb::Trigger) -> serde_json::Value {
    json!({
        "trigger_id": t.trigger_id, "source": t.source, "subject": t.subject,
        "bubble_id": t.bubble_id, "profile": t.profile, "module_sha384": t.module_sha384,
        "portion": t.portion, "function": t.function, "batch_size": t.batch_size,
        "max_concurrency": t.max_concurrency, "max_deliver": t.max_deliver,
        "created_at_ms": t.created_at_ms, "policy_digest": hex(&t.policy_digest),
        "max_pending": t.max_pending, "pending": t.pending, "seal_to": hex(&t.seal_to),
    })
}

fn print_trigger_line(t: &pb::Trigger) {
    let target = if t.bubble_id.is_empty() {
        format!("pool:{}", t.profile)
    } else {
        t.bubble_id.clone()
    };
    println!(
        "{}  {:<8} {:<24} {}  {}.{}  batch={} deliver={} pending={}/{}",
        t.trigger_id,
        t.source,
        t.subject,
        target,
        t.portion,
        t.function,
        t.batch_size,
        t.max_deliver,
        t.pending,
        t.max_pending
    );
}

pub(super) async fn trigger(conn: &Conn, cmd: TriggerCmd, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    match cmd {
        TriggerCmd::Create(a) => {
            let module = match &a.module {
                Some(p) => {
                    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    wat::parse_bytes(&b)
                        .with_context(|| format!("{} is neither wasm nor wat", p.display()))?
                        .into_owned()
                }
                None => Vec::new(),
            };
            let req = pb::CreateTriggerRequest {
                source: a.source,
                subject: a.subject,
                bubble_id: a.bubble.unwrap_or_default(),
                profile: a.profile.unwrap_or_default(),
                module,
                portion: a.portion,
                function: a.function,
                batch_size: a.batch_size,
                max_concurrency: a.max_concurrency,
                max_deliver: a.max_deliver,
                policy: match &a.policy_file {
                    Some(p) => Some(super::policy::to_pb(p)?),
                    None => None,
                },
                seal_to: match &a.seal_key_file {
                    Some(p) => seal_key(p)?.public_key().to_vec(),
                    None => Vec::new(),
                },
                max_pending: a.max_pending,
            };
            let t = c
                .create_trigger(req)
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!("{}", trigger_json(&t));
            } else if a.quiet {
                println!("{}", t.trigger_id);
            } else {
                print_trigger_line(&t);
            }
        }
        TriggerCmd::List => {
            let r = c
                .list_triggers(pb::ListTriggersRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                let v: Vec<_> = r.triggers.iter().map(trigger_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                r.triggers.iter().for_each(print_trigger_line);
            }
        }
        TriggerCmd::Delete { trigger } => {
            let t = c
                .delete_trigger(pb::TriggerRef {
                    trigger_id: trigger,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!("{}", trigger_json(&t));
            } else {
                println!("deleted {}", t.trigger_id);
            }
        }
        TriggerCmd::DeadLetters { trigger } => {
            let r = c
                .list_dead_letters(pb::TriggerRef {
                    trigger_id: trigger,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                let v: Vec<_> = r
                    .dead_letters
                    .iter()
                    .map(|d| json!({"key": d.key, "attempts": d.attempts, "reason": d.reason}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for d in &r.dead_letters {
                    println!("{}  attempts={}  {}", d.key, d.attempts, d.reason);
                }
            }
        }
        TriggerCmd::Replay { trigger, key } => {
            let r = c
                .replay_dead_letter(pb::ReplayDeadLetterRequest {
                    trigger_id: trigger,
                    key: key.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!("{}", json!({"key": key, "position": r.position}));
            } else {
                println!("{key} replayed at {}", r.position);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn publish(conn: &Conn, a: PublishArgs, j: bool) -> anyhow::Result<ExitCode> {
    let payload = match &a.file {
        Some(f) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        None => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("reading the payload from standard input")?;
            b
        }
    };
    let key = a
        .key
        .unwrap_or_else(|| format!("ev-{}", uuid::Uuid::new_v4().simple()));
    let mut c = conn.connect().await?;
    let r = c
        .publish_event(pb::PublishEventRequest {
            subject: a.subject,
            key: key.clone(),
            payload,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if j {
        println!(
            "{}",
            json!({"key": key, "position": r.position, "duplicate": r.duplicate})
        );
    } else if r.duplicate {
        println!("{key} duplicate (published before, at {})", r.position);
    } else {
        println!("{key} published at {}", r.position);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn results(conn: &Conn, a: ResultsArgs, j: bool) -> anyhow::Result<ExitCode> {
    let key = a.key_file.as_deref().map(seal_key).transpose()?;
    let mut c = conn.connect().await?;
    let r = c
        .get_result(pb::GetResultRequest {
            trigger_id: a.trigger,
            key: a.key,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    show_result(r, key.as_ref(), a.output, j)
}

/// `await-result`: the kept answer of one of your direct calls that
/// awaited a key.
pub(super) async fn await_result(
    conn: &Conn,
    a: AwaitResultArgs,
    j: bool,
) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let r = c
        .get_await_result(pb::GetAwaitResultRequest { key: a.key })
        .await
        .map_err(status_err)?
        .into_inner();
    show_result(r, None, a.output, j)
}

/// Prints a result (opening a sealed one with `key`).
fn show_result(
    mut r: pb::EventResult,
    key: Option<&bubble_keys::KemKeyPair>,
    output: OutputFormat,
    j: bool,
) -> anyhow::Result<ExitCode> {
    // A sealed output opens here only, with the parent's key.
    let mut opened = false;
    if let (true, Some(kem)) = (r.sealed, key) {
        let input_sha256: [u8; 32] = r
            .input_sha256
            .as_slice()
            .try_into()
            .context("the broker sent no input digest for a sealed result")?;
        let sealed = bubble_keys::SealedBox::decode(&r.output)
            .context("the sealed result does not parse")?;
        let plain = bubble_keys::open_result(kem, &r.bubble_id, r.call_id, &input_sha256, &sealed)
            .context("the sealed result does not open with this key")?;
        r.output = plain.expose().to_vec();
        opened = true;
    }
    if j {
        println!(
            "{}",
            json!({
                "key": r.key, "outcome": r.outcome, "reason": r.reason,
                "sealed": r.sealed, "opened": opened,
                "bubble_id": r.bubble_id, "call_id": r.call_id,
                "signature": hex(&r.signature), "output": hex(&r.output),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    match r.outcome.as_str() {
        "ok" => {
            eprintln!(
                "ok (bubble {}, call {}, signature {}){}",
                r.bubble_id,
                r.call_id,
                hex(&r.signature),
                match (r.sealed, opened) {
                    (true, true) => ", opened",
                    (true, false) => ", sealed: give --key-file to open it",
                    _ => "",
                }
            );
            write_output(&r.output, output)?;
        }
        other => println!(
            "{other}{}{}",
            if r.reason.is_empty() { "" } else { ": " },
            r.reason
        ),
    }
    Ok(ExitCode::SUCCESS)
}
