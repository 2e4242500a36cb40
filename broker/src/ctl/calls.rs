//! `call`, `watch`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::Args;
use serde_json::json;

use super::output::{hex, printable, state_label, status_err, unhex};
use super::Conn;

#[derive(Debug, Args)]
pub(super) struct CallArgs {
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
}

#[derive(Debug, Args)]
pub(super) struct WatchArgs {
    /// Only this bubble.
    bubble: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

pub(super) async fn call(conn: &Conn, a: CallArgs, j: bool) -> anyhow::Result<ExitCode> {
    let input = match (a.input, a.input_hex, a.input_file) {
        (Some(s), _, _) => s.into_bytes(),
        (_, Some(h), _) => unhex(&h)?,
        (_, _, Some(f)) => std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
        _ => Vec::new(),
    };
    let mut c = conn.connect().await?;
    let r = c
        .call(pb::CallRequest {
            bubble_id: a.bubble,
            op: a.op,
            input,
            deadline_ms: a.deadline_ms,
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
    Ok(ExitCode::SUCCESS)
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
