//! `pki init`, `pki add-parent`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub(super) enum PkiCmd {
    /// Create a CA, a server certificate and parent certificates.
    Init {
        /// Output directory.
        dir: PathBuf,
        /// Parent names (each gets parents/NAME.pem and .key).
        #[arg(long, value_delimiter = ',', default_value = "parent-a,parent-b")]
        parents: Vec<String>,
    },
    /// Issue a certificate for one more parent.
    AddParent {
        /// PKI directory.
        dir: PathBuf,
        /// Parent name.
        name: String,
    },
}

pub(super) fn run(cmd: PkiCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCmd::Init { dir, parents } => {
            crate::pki::init(&dir, &parents)?;
            if j {
                println!("{}", json!({"dir": dir, "parents": parents}));
            } else {
                println!(
                    "PKI written to {} (parents: {})",
                    dir.display(),
                    parents.join(", ")
                );
            }
        }
        PkiCmd::AddParent { dir, name } => {
            crate::pki::add_parent(&dir, &name)?;
            println!("issued parents/{name}.pem in {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
