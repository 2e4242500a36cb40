//! `audit`: a parent's records in the broker's audit log, and `audit
//! verify FILE`: the offline check of a log's chain and checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{status_err, unhex};
use super::Conn;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
    /// Only this bubble's records.
    #[arg(long)]
    bubble: Option<String>,
    /// Only records since T: Unix milliseconds, or an age such as 90s,
    /// 10m, 2h or 1d.
    #[arg(long)]
    since: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Check an audit log file offline: its chain, sequence and signed
    /// checkpoints; a failure names the record.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The log (DATA_DIR/audit/audit.log).
    file: PathBuf,
    /// Require checkpoints signed by this key (the broker's usage key,
    /// hex). Without it, all checkpoints must share one key, and that key
    /// (the first checkpoint's) is trusted as found: a warning says so.
    #[arg(long)]
    key: Option<String>,
}

/// `--since`: Unix milliseconds, or an age before now.
fn since_ms(s: &str, now_ms: u64) -> anyhow::Result<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n
        .parse()
        .with_context(|| format!("--since {s}: Unix ms or an age like 10m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("--since {s}: the age unit is s, m, h or d"),
    };
    Ok(now_ms.saturating_sub(secs.saturating_mul(1000)))
}

fn detail(r: &pb::AuditRecord) -> String {
    match r.r#type.as_str() {
        "lifecycle" if r.reason.is_empty() => r.state.clone(),
        "lifecycle" => format!("{}: {}", r.state, r.reason),
        "credential" => format!(
            "{} {} {}",
            r.credential_action,
            if r.credential_name.is_empty() {
                "(unnamed)"
            } else {
                &r.credential_name
            },
            r.outcome
        ),
        "security" => r.security_kind.clone(),
        "admin" => r.admin_action.clone(),
        other => other.to_string(),
    }
}

fn record_json(r: &pb::AuditRecord) -> serde_json::Value {
    json!({
        "seq": r.seq, "at_ms": r.at_ms, "bubble_id": r.bubble_id, "owner": r.owner,
        "parent": r.parent, "portion_digest": r.portion_digest, "type": r.r#type,
        "state": r.state, "reason": r.reason, "credential_action": r.credential_action,
        "credential_name": r.credential_name, "outcome": r.outcome,
        "security_kind": r.security_kind, "admin_action": r.admin_action,
    })
}

pub(super) async fn run(conn: &Conn, a: AuditArgs, j: bool) -> anyhow::Result<ExitCode> {
    if let Some(AuditCmd::Verify(v)) = a.cmd {
        return verify(v, j);
    }
    let since = match &a.since {
        Some(s) => since_ms(s, crate::clock::now_ms())?,
        None => 0,
    };
    let mut c = conn.connect().await?;
    // Every page, in order.
    let mut records = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_audit(pb::ListAuditRequest {
                bubble_id: a.bubble.clone().unwrap_or_default(),
                since_ms: since,
                page_size: 0,
                page_token: token,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if j {
        let v: Vec<_> = records.iter().map(record_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6}  {:<13}  {:<10}  {:<34}  {:<16}  DETAIL",
        "SEQ", "AT_MS", "TYPE", "BUBBLE", "PARENT"
    );
    for r in &records {
        println!(
            "{:>6}  {:<13}  {:<10}  {:<34}  {:<16}  {}",
            r.seq,
            r.at_ms,
            r.r#type,
            r.bubble_id,
            r.parent,
            detail(r)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(v: VerifyArgs, j: bool) -> anyhow::Result<ExitCode> {
    let key = match &v.key {
        Some(k) => Some(
            <[u8; 32]>::try_from(unhex(k)?.as_slice())
                .map_err(|_| anyhow::anyhow!("--key: 32 bytes of hex"))?,
        ),
        None => None,
    };
    let bytes = std::fs::read(&v.file).with_context(|| v.file.display().to_string())?;
    match bubble_audit::verify(&bytes, key) {
        Ok(s) => {
            if !s.key_checked {
                eprintln!(
                    "WARNING: no --key given: the checkpoints were checked against the key of the \
                     first checkpoint ({}), which the file itself names; anyone who rewrote the \
                     whole log with their own key passes this check. Give --key with the broker's \
                     usage key to check who signed it.",
                    if s.key.is_empty() { "none" } else { &s.key }
                );
            }
            if j {
                println!("{}", json!({"ok": true, "summary": s}));
            } else {
                println!(
                    "OK: {} records, {} signed checkpoints by key {}{}; {} records after the last checkpoint; {} recovered after a crash",
                    s.records,
                    s.checkpoints,
                    s.key,
                    if s.key_checked { " (as given)" } else { " (NOT checked: trusted as found)" },
                    s.unsigned_tail,
                    s.recovered
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if j {
                println!(
                    "{}",
                    json!({"ok": false, "record": e.record, "offset": e.offset, "error": e.to_string()})
                );
            } else {
                eprintln!("FAILED: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_ms_or_an_age() {
        assert_eq!(since_ms("1234", 0).unwrap(), 1234);
        assert_eq!(since_ms("10m", 3_600_000).unwrap(), 3_000_000);
        assert_eq!(since_ms("1d", 1000).unwrap(), 0);
        assert!(since_ms("5y", 0).is_err());
        assert!(since_ms("m", 0).is_err());
    }
}
