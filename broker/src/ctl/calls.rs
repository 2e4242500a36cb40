//! `call`, `watch`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::Args;
use serde_json::json;

use super::output::{hex, state_label, status_err, unhex, write_output, OutputFormat};
use super::trust::TrustArgs;
use super::Conn;

#[derive(Debug, Args)]
pub(super) struct CallArgs {
    /// Bubble id.
    bubble: String,
    /// Operation ("echo", "sha256"), or with --portion the portion's
    /// function.
    op: String,
    /// Call a function of this loaded portion.
    #[arg(long)]
    portion: Option<String>,
    /// Input as text (on the command line: any local user can read it in
    /// /proc; use --input-file or --input-stdin for secrets).
    #[arg(long, conflicts_with_all = ["input_hex", "input_file", "input_stdin"])]
    input: Option<String>,
    /// Input as hex (on the command line, like --input).
    #[arg(long, conflicts_with_all = ["input_file", "input_stdin"])]
    input_hex: Option<String>,
    /// Input from a file.
    #[arg(long, conflicts_with = "input_stdin")]
    input_file: Option<PathBuf>,
    /// Input from standard input (read to its end).
    #[arg(long)]
    input_stdin: bool,
    /// Deadline in milliseconds (0: broker default; unsigned calls only).
    #[arg(long, default_value_t = 0, conflicts_with_all = ["sign", "seal", "seal_to", "sealed_input"])]
    deadline_ms: u32,
    /// Have the bubble sign the result and verify it with its attested key
    /// (needs --measurement and the other trust options).
    #[arg(long)]
    sign: bool,
    /// Have the bubble seal the result to a fresh key of this command
    /// (the broker sees ciphertext only); signed and verified too.
    #[arg(long)]
    seal: bool,
    /// Have the bubble seal the result to this X25519 public key (64 hex
    /// digits, or a file of 32 bytes or 64 hex digits; `bubblectl keygen`
    /// makes one): the signature is verified and the output is a JSON
    /// envelope that only the key's holder opens (`bubblectl open`).
    #[arg(long, conflicts_with_all = ["seal", "plain_input"], value_name = "PUBLIC_KEY")]
    seal_to: Option<String>,
    /// Seal the input to the bubble's attested key (a sealed session; the
    /// broker sees ciphertext only) and verify the signed result. The
    /// default for portion calls with --sign or --seal; needs --portion
    /// and the trust options.
    #[arg(long, requires = "portion", conflicts_with = "plain_input")]
    sealed_input: bool,
    /// With --sign or --seal on a portion call: send the input in
    /// plaintext (the broker sees it), for inputs that are not secret.
    #[arg(long, requires = "portion", conflicts_with = "seal")]
    plain_input: bool,
    /// How to print the output: text (UTF-8, other bytes escaped as \xNN),
    /// hex, or raw bytes.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Write the raw output to this file instead of printing it.
    #[arg(long)]
    output_file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
}

#[derive(Debug, Args)]
pub(super) struct WatchArgs {
    /// Only this bubble.
    bubble: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Debug, Args)]
pub(super) struct LogsArgs {
    /// Bubble id.
    bubble: String,
    /// Keep printing new lines as they come.
    #[arg(short, long)]
    follow: bool,
    /// Stop after this many lines.
    #[arg(long)]
    count: Option<u64>,
}

/// What a call answered.
struct Answer {
    output: Vec<u8>,
    /// VMM time (unsigned calls only: the client library's verified calls
    /// do not return it).
    vmm_us: Option<u64>,
}

pub(super) async fn call(conn: &Conn, a: CallArgs, j: bool) -> anyhow::Result<ExitCode> {
    let input = match (&a.input, &a.input_hex, &a.input_file) {
        (Some(s), _, _) => s.clone().into_bytes(),
        (_, Some(h), _) => unhex(h)?,
        (_, _, Some(f)) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        _ if a.input_stdin => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)
                .context("reading the input from standard input")?;
            v
        }
        _ => Vec::new(),
    };
    let sealing = a.portion.is_some()
        && (a.sign || a.seal || a.sealed_input || a.seal_to.is_some())
        && !a.plain_input;
    if sealing && (a.input.is_some() || a.input_hex.is_some()) {
        eprintln!(
            "warning: the input is sealed for the bubble, but --input/--input-hex put it in \
             this command's argv, which local users can read; use --input-file or --input-stdin"
        );
    }
    let ans = if a.sign || a.seal || a.sealed_input || a.seal_to.is_some() {
        match verified_call(conn, &a, &input).await {
            Ok(ans) => ans,
            Err(e) => match e.downcast_ref::<bubble_client::ClientError>() {
                Some(bubble_client::ClientError::Awaiting {
                    key,
                    deadline_ms,
                    generation,
                }) => {
                    print_awaiting(key, *generation, *deadline_ms, j);
                    return Ok(ExitCode::SUCCESS);
                }
                _ => return Err(e),
            },
        }
    } else {
        let mut c = conn.connect().await?;
        let r = c
            .call(pb::CallRequest {
                bubble_id: a.bubble.clone(),
                op: a.op.clone(),
                input,
                deadline_ms: a.deadline_ms,
                portion: a.portion.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(status_err)?
            .into_inner();
        if let Some(w) = r.awaiting {
            print_awaiting(&w.key, w.generation, w.deadline_ms, j);
            return Ok(ExitCode::SUCCESS);
        }
        Answer {
            output: r.output,
            vmm_us: Some(r.vmm_us),
        }
    };
    if let Some(f) = &a.output_file {
        std::fs::write(f, &ans.output).with_context(|| format!("writing {}", f.display()))?;
    }
    if j {
        let mut v = json!({"output_len": ans.output.len(), "vmm_us": ans.vmm_us,
                           "signature_verified": a.sign || a.seal || a.sealed_input || a.seal_to.is_some(),
                           "sealed": a.seal || a.seal_to.is_some(),
                           "input_sealed": a.portion.is_some() && (a.sign || a.seal || a.sealed_input) && !a.plain_input});
        if a.output_file.is_none() {
            v["output_hex"] = json!(hex(&ans.output));
        }
        println!("{v}");
    } else if a.output_file.is_none() {
        write_output(&ans.output, a.output)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The portion awaits an event: the bubble is frozen with the call
/// pending (docs/awaits.md).
fn print_awaiting(key: &str, generation: u64, deadline_ms: u64, j: bool) {
    if j {
        println!(
            "{}",
            json!({"awaiting": {"key": key, "deadline_ms": deadline_ms, "generation": generation}})
        );
    } else {
        println!(
            "awaiting {key} (frozen at generation {generation}; times out at {deadline_ms} ms)"
        );
    }
}

/// A signed (and optionally sealed) call through the client library,
/// after attesting the bubble.
async fn verified_call(conn: &Conn, a: &CallArgs, input: &[u8]) -> anyhow::Result<Answer> {
    let bubble = a.trust.attested(conn, &a.bubble).await?;
    if let Some(to) = &a.seal_to {
        let pk = super::sealed::recipient_key(to)?;
        let r = match &a.portion {
            Some(p) => bubble.portion(p).call_sealed_to(&a.op, input, &pk).await?,
            None => bubble.call_sealed_to(&a.op, input, &pk).await?,
        };
        return Ok(Answer {
            output: super::sealed::envelope(&r, &pk),
            vmm_us: None,
        });
    }
    let output = match (&a.portion, a.seal) {
        (Some(p), false) if a.plain_input => {
            bubble.portion(p).call_plain_input(&a.op, input).await?
        }
        (Some(p), false) => bubble.portion(p).call(&a.op, input).await?,
        (Some(p), true) => bubble
            .portion(p)
            .call_sealed(&a.op, input)
            .await?
            .expose()
            .to_vec(),
        (None, false) => bubble.call_verified(&a.op, input).await?,
        (None, true) => bubble.call_sealed(&a.op, input).await?.expose().to_vec(),
    };
    Ok(Answer {
        output,
        vmm_us: None,
    })
}

pub(super) async fn watch(conn: &Conn, a: WatchArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            bubble_id: a.bubble.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(ev) = s.message().await.map_err(status_err)? {
        if j {
            println!(
                "{}",
                json!({"bubble_id": ev.bubble_id, "state": state_label(ev.state), "reason": ev.reason, "at_ms": ev.at_ms,
                    "security": ev.security.as_ref().map(|s| json!({"kind": s.kind, "parent": s.parent, "portion_digest": s.portion_digest}))})
            );
        } else {
            println!(
                "{}  {:<34}  {:<9}  {}",
                ev.at_ms,
                ev.bubble_id,
                state_label(ev.state),
                match &ev.security {
                    Some(s) => format!("security: {} {}", s.kind, s.parent),
                    None => ev.reason.clone(),
                }
            );
        }
        seen += 1;
        if a.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `logs BUBBLE [--follow]`: the guest's and its portions' log lines.
pub(super) async fn logs(conn: &Conn, a: LogsArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let mut s = c
        .stream_logs(pb::StreamLogsRequest {
            bubble_id: a.bubble,
            follow: a.follow,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut seen = 0u64;
    while a.count.is_none_or(|n| seen < n) {
        let Some(l) = s.message().await.map_err(status_err)? else {
            break;
        };
        seen += 1;
        if j {
            println!(
                "{}",
                json!({"seq": l.seq, "at_ms": l.at_ms, "text": l.text})
            );
        } else {
            println!("{}  {}", l.at_ms, l.text);
        }
    }
    Ok(ExitCode::SUCCESS)
}
