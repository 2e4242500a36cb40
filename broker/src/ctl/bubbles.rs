//! `create`, `attach`, `list`, `describe`, `delete`.

use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::Args;

use super::output::{print_bubbles, print_reply, status_err};
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
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    /// Include deleted bubbles.
    #[arg(long)]
    all: bool,
}

/// Creates a bubble; fails (exit 1) when it ends FAILED.
pub(super) async fn create(conn: &Conn, a: CreateArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let req = pb::CreateBubbleRequest {
        idle: None,
        policy: None,
        client_request_id: a.request_id,
        memory_mib: a.memory_mib,
        vcpus: 1,
        image: a.image,
    };
    let b = print_reply(c.create_bubble(req).await, j)?;
    if b.state == pb::BubbleState::Failed as i32 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn attach(conn: &Conn, a: AttachArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let req = pb::AttachBubbleRequest {
        profile: a.profile,
        wait_ms: a.wait_ms,
        idle: None,
        client_request_id: a.request_id,
    };
    print_reply(c.attach_bubble(req).await, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn list(conn: &Conn, a: ListArgs, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let r = c
        .list_bubbles(pb::ListBubblesRequest {
            include_deleted: a.all,
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    print_bubbles(&r.bubbles, j);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn describe(conn: &Conn, a: BubbleArg, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let bubble = pb::BubbleRef {
        bubble_id: a.bubble,
    };
    print_reply(c.describe_bubble(bubble).await, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn delete(conn: &Conn, a: BubbleArg, j: bool) -> anyhow::Result<ExitCode> {
    let mut c = conn.connect().await?;
    let bubble = pb::BubbleRef {
        bubble_id: a.bubble,
    };
    print_reply(c.delete_bubble(bubble).await, j)?;
    Ok(ExitCode::SUCCESS)
}
