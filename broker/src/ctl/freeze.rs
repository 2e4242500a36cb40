//! `suspend`, `restore`, `frozen list`.

use std::path::PathBuf;
use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::{Args, Subcommand};

use super::output::{print_bubbles, print_reply, status_err};
use super::Conn;

#[derive(Debug, Args)]
pub(super) struct SuspendArgs {
    /// Bubble id.
    bubble: String,
    /// A file holding a 32-byte key-encryption key that you keep (64 hex
    /// digits or 32 raw bytes, mode 0600; `-` reads standard input;
    /// default: $BUBBLECTL_KEK if set). Restore then needs it.
    #[arg(long)]
    kek_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct RestoreArgs {
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
}

#[derive(Debug, Subcommand)]
pub(super) enum FrozenCmd {
    /// List your suspended bubbles.
    List,
}

pub(super) async fn suspend(conn: &Conn, a: SuspendArgs, j: bool) -> anyhow::Result<ExitCode> {
    let kek = crate::kek_input::read_kek(a.kek_file.as_deref())?;
    let mut c = conn.connect().await?;
    eprintln!("suspending {}...", a.bubble);
    let req = pb::SuspendBubbleRequest {
        bubble_id: a.bubble,
        kek: kek.to_vec(),
    };
    print_reply(c.suspend_bubble(req).await, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn restore(conn: &Conn, a: RestoreArgs, j: bool) -> anyhow::Result<ExitCode> {
    let kek = crate::kek_input::read_kek(a.kek_file.as_deref())?;
    let mut c = conn.connect().await?;
    eprintln!("verifying and restoring {}...", a.bubble);
    let req = pb::RestoreBubbleRequest {
        bubble_id: a.bubble,
        kek: kek.to_vec(),
        generation: a.generation,
    };
    print_reply(c.restore_bubble(req).await, j)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn frozen(conn: &Conn, cmd: FrozenCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        FrozenCmd::List => {
            let mut c = conn.connect().await?;
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
            print_bubbles(&frozen, j);
        }
    }
    Ok(ExitCode::SUCCESS)
}
