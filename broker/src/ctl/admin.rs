//! `admin`: operator commands, for a parent named in the broker's
//! `admins` configuration (anyone else gets PERMISSION_DENIED, exit 17).

use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::Subcommand;
use serde_json::json;

use super::output::status_err;
use super::Conn;

#[derive(Debug, Subcommand)]
pub(super) enum AdminCmd {
    /// Bubbles of every parent: list, describe, delete; drain.
    #[command(flatten)]
    Bubbles(super::bubbles::AdminCmd),
    /// Modules quarantined after repeated security events.
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Stream every parent's security events (one per line) until
    /// interrupted, or until `--count` have come.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum QuarantineCmd {
    /// Every quarantined module, with the parent it is quarantined for.
    List,
    /// Lift a module's quarantine (for every parent, or one).
    Lift {
        /// The module's SHA-384 digest (96 hex digits, as `list` shows it).
        digest: String,
        /// Only for this parent (e.g. `cert:shop`, `uid:1000`).
        #[arg(long)]
        parent: Option<String>,
    },
}

pub(super) async fn run(conn: &Conn, cmd: AdminCmd, j: bool) -> anyhow::Result<ExitCode> {
    if let AdminCmd::Bubbles(b) = cmd {
        return super::bubbles::admin(conn, b, j).await;
    }
    let mut c = conn.connect().await?;
    match cmd {
        // Answered above (it connects on its own).
        AdminCmd::Bubbles(_) => {}
        AdminCmd::Events { count } => {
            let mut s = c
                .admin_watch_events(pb::AdminWatchEventsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                let Some(e) = s.message().await.map_err(status_err)? else {
                    break;
                };
                seen += 1;
                if j {
                    println!(
                        "{}",
                        json!({"bubble_id": e.bubble_id, "owner": e.owner, "parent": e.parent,
                               "portion_digest": e.portion_digest, "kind": e.kind,
                               "at_ms": e.at_ms})
                    );
                } else {
                    println!(
                        "{}  {:<20}  {:<34}  owner={}  parent={}  portion={}",
                        e.at_ms, e.kind, e.bubble_id, e.owner, e.parent, e.portion_digest
                    );
                }
            }
        }
        AdminCmd::Quarantine(QuarantineCmd::List) => {
            let r = c
                .admin_quarantine_list(pb::AdminQuarantineListRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                let v: Vec<_> = r
                    .modules
                    .iter()
                    .map(|m| {
                        json!({"parent": m.parent, "portion_digest": m.portion_digest,
                               "reason": m.reason, "since_ms": m.since_ms})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<24}  {:<96}  {:>13}  REASON",
                    "PARENT", "DIGEST", "SINCE_MS"
                );
                for m in &r.modules {
                    println!(
                        "{:<24}  {:<96}  {:>13}  {}",
                        m.parent, m.portion_digest, m.since_ms, m.reason
                    );
                }
            }
        }
        AdminCmd::Quarantine(QuarantineCmd::Lift { digest, parent }) => {
            let r = c
                .admin_quarantine_lift(pb::AdminQuarantineLiftRequest {
                    portion_digest: digest.clone(),
                    parent: parent.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!("{}", json!({"portion_digest": digest, "lifted": r.lifted}));
            } else {
                println!("lifted {digest} for {} parent(s)", r.lifted);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
