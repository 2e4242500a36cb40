//! Trusting a bubble's keys before sealing to it or verifying its results:
//! the CLI attests the bubble with a fresh nonce against the expectations
//! given on the command line, through the client library.

use std::path::PathBuf;

use anyhow::Context;
use bubble_client::{Bubble, Expectations, Parent};
use clap::Args;
use sha2::{Digest, Sha384};

use super::output::unhex;
use super::Conn;

/// What the bubble must be for its keys to be trusted.
#[derive(Debug, Args)]
pub(super) struct TrustArgs {
    /// Expected launch measurement, 96 hex digits (`bubblectl measure
    /// --memory-mib N` prints it). Required to trust the bubble.
    #[arg(long)]
    measurement: Option<String>,
    /// Accept reports of the simulated PSP (no hardware protection).
    #[arg(long)]
    allow_sim: bool,
    /// For SIMULATED reports: the operator's ARK to trust (DER, e.g.
    /// DATA_DIR/psp/ark.der, obtained from the operator out of band).
    #[arg(long)]
    ark: Option<PathBuf>,
    /// The security policy the bubble must run under (the file given to
    /// `create --policy-file`; default: the broker's default policy).
    #[arg(long)]
    expect_policy_file: Option<PathBuf>,
    /// A portion the bubble must hold, NAME=FILE (WebAssembly binary or
    /// text), in load order; repeat for each.
    #[arg(long = "expect-portion", value_name = "NAME=FILE")]
    expect_portions: Vec<String>,
    /// Your name at the broker (default: uid:<your uid> on the Unix
    /// socket, cert:<--parent> over mutual TLS).
    #[arg(long)]
    owner: Option<String>,
}

impl TrustArgs {
    fn owner(&self, conn: &Conn) -> String {
        if let Some(o) = &self.owner {
            return o.clone();
        }
        match (&conn.endpoint, &conn.parent) {
            (Some(_), Some(p)) => format!("cert:{p}"),
            _ => {
                // SAFETY: getuid has no preconditions and cannot fail.
                let uid = unsafe { libc::getuid() };
                format!("uid:{uid}")
            }
        }
    }

    fn expectations(&self, conn: &Conn, bubble_id: &str) -> anyhow::Result<Expectations> {
        let m = self.measurement.as_deref().context(
            "trusting the bubble needs --measurement HEX (`bubblectl measure` prints it)",
        )?;
        let measurement: [u8; 48] = unhex(m)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("--measurement must be 96 hex digits"))?;
        let mut e = Expectations::new(measurement, bubble_id, &self.owner(conn))
            .with_security_policy(super::policy::expected(self.expect_policy_file.as_deref())?);
        if self.allow_sim {
            e = e.allow_sim();
        }
        for spec in &self.expect_portions {
            let (name, file) = spec
                .split_once('=')
                .context("--expect-portion takes NAME=FILE")?;
            let module = read_module(file.as_ref())?;
            e.portions
                .push((name.to_string(), Sha384::digest(&module).to_vec()));
        }
        Ok(e)
    }

    /// Attests `bubble_id` and returns a handle whose keys are trusted.
    pub(super) async fn attested(&self, conn: &Conn, bubble_id: &str) -> anyhow::Result<Bubble> {
        let expect = self.expectations(conn, bubble_id)?;
        let ark = match &self.ark {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        let parent = Parent::from_client(conn.connect().await?);
        let mut bubble = parent.bubble(bubble_id);
        bubble.attest(&expect, ark.as_deref()).await?;
        Ok(bubble)
    }
}

/// A portion module from a file: WebAssembly binary, or text (compiled
/// here).
pub(super) fn read_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let module = wat::parse_bytes(&bytes)
        .with_context(|| format!("{} is not WebAssembly", path.display()))?;
    Ok(module.into_owned())
}
