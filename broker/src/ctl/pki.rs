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
        /// Another name of the broker for its server certificate, a DNS
        /// name or an IP address (repeatable; localhost and 127.0.0.1 are
        /// always included).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Issue a certificate for one more parent.
    AddParent {
        /// PKI directory.
        dir: PathBuf,
        /// Parent name.
        name: String,
        /// Replace the parent's existing certificate and key.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn run(cmd: PkiCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCmd::Init { dir, parents, sans } => {
            crate::pki::init_with_sans(&dir, &parents, &sans)?;
            if j {
                println!("{}", json!({"dir": dir, "parents": parents, "sans": sans}));
            } else {
                println!(
                    "PKI written to {} (parents: {})",
                    dir.display(),
                    parents.join(", ")
                );
            }
        }
        PkiCmd::AddParent { dir, name, force } => {
            crate::pki::add_parent(&dir, &name, force)?;
            if j {
                println!("{}", json!({"dir": dir, "parent": name}));
            } else {
                println!("issued parents/{name}.pem in {}", dir.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
