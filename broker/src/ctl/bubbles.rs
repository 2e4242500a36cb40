//! `create`, `attach`, `list`, `describe`, `delete`.

use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::Args;

use std::path::PathBuf;

use super::output::{print_bubble, print_bubbles, print_owned_table, print_reply, status_err};
use super::policy::IdleArgs;
use super::{BubbleArg, Conn};

#[derive(Debug, Args)]
pub(super) struct CreateArgs {
    /// Guest memory in MiB (4-4096).
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
    /// Idempotency key: retrying with the same key never makes two bubbles.
    #[arg(long, default_value = "")]
    request_id: String,
    /// Guest image ("shim").
    #[arg(long, default_value = "shim")]
    image: String,
    /// Security policy for portions (TOML: fuel_per_call,
    /// memory_limit_bytes, call_deadline_ms, max_output_bytes, [[grants]]
    /// portion and credentials, [credential_rate] per_sec and burst).
    #[arg(long)]
    policy_file: Option<PathBuf>,
    #[command(flatten)]
    idle: IdleArgs,
    /// Print only the bubble id.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub(super) struct AttachArgs {
    /// Warm-pool profile.
    profile: String,
    /// On a miss, wait up to this long for the pool before booting one.
    #[arg(long, default_value_t = 0)]
    wait_ms: u32,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    request_id: String,
    /// Security policy for portions, as for `create`; installed in the
    /// pooled bubble before it is handed over.
    #[arg(long)]
    policy_file: Option<PathBuf>,
    #[command(flatten)]
    idle: IdleArgs,
    /// Print only the bubble id.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    /// Include deleted bubbles.
    #[arg(long)]
    all: bool,
    /// Print only the bubble ids, one a line.
    #[arg(short, long)]
    quiet: bool,
    /// Every parent's bubbles and the warm pools' (operators: your parent
    /// id must be in the broker's `admins`).
    #[arg(long)]
    all_parents: bool,
}

/// Prints a bubble an RPC answered with: its id alone under `--quiet`.
fn show(
    reply: Result<tonic::Response<pb::Bubble>, tonic::Status>,
    quiet: bool,
    j: bool,
) -> anyhow::Result<pb::Bubble> {
    let b = reply.map_err(status_err)?.into_inner();
    if quiet {
        println!("{}", b.bubble_id);
    } else {
        print_bubble(&b, j);
    }
    Ok(b)
}

/// Creates a bubble; fails (exit 1) when it ends FAILED.
pub(super) async fn create(conn: &Conn, a: CreateArgs, j: bool) -> anyhow::Result<ExitCode> {
    let policy = match &a.policy_file {
        Some(p) => Some(super::policy::to_pb(p)?),
        None => None,
    };
    let mut c = conn.connect().await?;
    let req = pb::CreateBubbleRequest {
        idle: a.idle.to_pb(),
        policy,
        client_request_id: a.request_id,
        memory_mib: a.memory_mib,
        vcpus: 1,
        image: a.image,
    };
    let b = show(c.create_bubble(req).await, a.quiet, j)?;
    if b.state == pb::BubbleState::Failed as i32 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn attach(conn: &Conn, a: AttachArgs, j: bool) -> anyhow::Result<ExitCode> {
    let policy = match &a.policy_file {
        Some(p) => Some(super::policy::to_pb(p)?),
        None => None,
    };
    let mut c = conn.connect().await?;
    let req = pb::AttachBubbleRequest {
        profile: a.profile,
        wait_ms: a.wait_ms,
        idle: a.idle.to_pb(),
        client_request_id: a.request_id,
        policy,
    };
    show(c.attach_bubble(req).await, a.quiet, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn list(conn: &Conn, a: ListArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    // Every page, following next_page_token to the end.
    let mut bubbles = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_bubbles(pb::ListBubblesRequest {
                include_deleted: a.all,
                all_parents: a.all_parents,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(status_err)?
            .into_inner();
        bubbles.extend(r.bubbles);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    if a.quiet {
        for b in &bubbles {
            println!("{}", b.bubble_id);
        }
    } else {
        if a.all_parents && !j {
            print_owned_table(&bubbles);
        } else {
            print_bubbles(&bubbles, j);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn describe(conn: &Conn, a: BubbleArg, j: bool) -> anyhow::Result<ExitCode> {
    describe_as(conn, a, conn.admin, j).await
}

async fn describe_as(conn: &Conn, a: BubbleArg, admin: bool, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let bubble = pb::BubbleRef {
        bubble_id: a.bubble,
    };
    let r = if admin {
        c.admin_describe_bubble(bubble).await
    } else {
        c.describe_bubble(bubble).await
    };
    print_reply(r, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn delete(conn: &Conn, a: BubbleArg, j: bool) -> anyhow::Result<ExitCode> {
    delete_as(conn, a, conn.admin, j).await
}

async fn delete_as(conn: &Conn, a: BubbleArg, admin: bool, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let bubble = pb::BubbleRef {
        bubble_id: a.bubble,
    };
    let r = if admin {
        c.admin_delete_bubble(bubble).await
    } else {
        c.delete_bubble(bubble).await
    };
    print_reply(r, j)?;
    Ok(ExitCode::SUCCESS)
}

/// `bubblectl admin ...`.
#[derive(Debug, clap::Subcommand)]
pub(super) enum AdminCmd {
    /// Every parent's bubbles and the warm pools' (as `list --all-parents`).
    List {
        /// Include deleted bubbles.
        #[arg(long)]
        all: bool,
        /// Print only the bubble ids, one a line.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Describe any parent's bubble (as `--admin describe`).
    Describe(BubbleArg),
    /// Delete any parent's bubble (as `--admin delete`).
    Delete(BubbleArg),
    /// Stop accepting new bubbles (create, attach: UNAVAILABLE); prints how
    /// many bubbles still run.
    Drain {
        /// Accept new bubbles again.
        #[arg(long)]
        undo: bool,
    },
}

pub(super) async fn admin(conn: &Conn, cmd: AdminCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCmd::List { all, quiet } => {
            let a = ListArgs {
                all,
                quiet,
                all_parents: true,
            };
            return list(conn, a, j).await;
        }
        AdminCmd::Describe(a) => return describe_as(conn, a, true, j).await,
        AdminCmd::Delete(a) => return delete_as(conn, a, true, j).await,
        AdminCmd::Drain { undo } => {
            let mut c = conn.connect().await?;
            let r = c
                .admin_drain(pb::AdminDrainRequest { drain: !undo })
                .await
                .map_err(status_err)?
                .into_inner();
            if j {
                println!(
                    "{}",
                    serde_json::json!({"draining": r.draining, "live_bubbles": r.live_bubbles})
                );
            } else if r.draining {
                println!("draining: {} bubbles still running", r.live_bubbles);
            } else {
                println!("accepting new bubbles ({} running)", r.live_bubbles);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
