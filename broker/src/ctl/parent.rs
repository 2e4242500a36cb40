//! `provision`, `portion load`: a parent's credentials and code.

use std::path::PathBuf;
use std::process::ExitCode;

use bubble_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::output::{hex, status_err};
use super::trust::{read_module, TrustArgs};
use super::Conn;
use crate::kek_input::{read_private_file, read_stdin};

#[derive(Debug, Args)]
pub(super) struct ProvisionArgs {
    /// Bubble id.
    bubble: String,
    /// Credential name (as the security policy's grants name it).
    name: String,
    #[command(flatten)]
    source: SecretSource,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Where the credential's value comes from: never argv.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct SecretSource {
    /// Read the value from this file (mode 0600 or stricter).
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// Read the value from standard input.
    #[arg(long)]
    from_stdin: bool,
    /// Read the value from this environment variable.
    #[arg(long, value_name = "VAR")]
    from_env: Option<String>,
}

impl SecretSource {
    fn read(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        if let Some(p) = &self.from_file {
            return read_private_file(p, "credential");
        }
        if self.from_stdin {
            return read_stdin("the credential");
        }
        let var = self.from_env.as_deref().unwrap_or_default();
        match std::env::var_os(var) {
            Some(v) => Ok(Zeroizing::new(v.into_encoded_bytes())),
            None => anyhow::bail!("environment variable {var} is not set"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum PortionCmd {
    /// Load a WebAssembly module (binary or text) as a portion.
    Load {
        /// Bubble id.
        bubble: String,
        /// Portion name.
        name: String,
        /// Module file.
        file: PathBuf,
    },
}

/// Attests the bubble, then seals the credential to its attested key and
/// provisions it (the broker sees only ciphertext).
pub(super) async fn provision(conn: &Conn, a: ProvisionArgs, j: bool) -> anyhow::Result<ExitCode> {
    let secret = a.source.read()?;
    anyhow::ensure!(!secret.is_empty(), "the credential is empty");
    let bubble = a.trust.attested(conn, &a.bubble).await?;
    bubble.provision(&a.name, &secret).await?;
    if j {
        println!(
            "{}",
            json!({"bubble_id": a.bubble, "credential": a.name, "sealed_to_attested_key": true})
        );
    } else {
        println!(
            "provisioned {} to {} (sealed to its attested key)",
            a.name, a.bubble
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn portion(conn: &Conn, cmd: PortionCmd, j: bool) -> anyhow::Result<ExitCode> {
    let PortionCmd::Load { bubble, name, file } = cmd;
    let module = read_module(&file)?;
    let mut c = conn.connect().await?;
    let r = c
        .load_portion(pb::LoadPortionRequest {
            bubble_id: bubble.clone(),
            name: name.clone(),
            module,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if j {
        println!(
            "{}",
            json!({"bubble_id": bubble, "portion": name,
                   "module_sha384_hex": hex(&r.module_sha384),
                   "portions_digest_hex": hex(&r.portions_digest)})
        );
    } else {
        println!("loaded portion {name} into {bubble}");
        println!("module sha384    {}", hex(&r.module_sha384));
        println!("portions digest  {}", hex(&r.portions_digest));
    }
    Ok(ExitCode::SUCCESS)
}
