//! `pki init`, `pki add-parent`, `pki revoke`.

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
        /// Validity of every certificate, in days from now (default: until
        /// the year 4096).
        #[arg(long)]
        days: Option<u32>,
    },
    /// Issue a certificate for one more parent.
    AddParent {
        /// PKI directory.
        dir: PathBuf,
        /// Parent name.
        name: String,
        /// Replace the parent's existing certificate and key (the
        /// replaced certificate is revoked).
        #[arg(long)]
        force: bool,
        /// Validity in days from now (default: until the year 4096).
        #[arg(long)]
        days: Option<u32>,
    },
    /// Revoke a parent's current certificate (or the one in --cert): the
    /// broker refuses it from its next request on (DIR/revoked).
    Revoke {
        /// PKI directory.
        dir: PathBuf,
        /// Parent name (its parents/NAME.pem is revoked).
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        name: Option<String>,
        /// A certificate file (PEM) to revoke instead.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

pub(super) fn run(cmd: PkiCmd, j: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCmd::Init {
            dir,
            parents,
            sans,
            days,
        } => {
            crate::pki::init_with_sans(&dir, &parents, &sans, days)?;
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
        PkiCmd::AddParent {
            dir,
            name,
            force,
            days,
        } => {
            crate::pki::add_parent(&dir, &name, force, days)?;
            if j {
                println!("{}", json!({"dir": dir, "parent": name}));
            } else {
                println!("issued parents/{name}.pem in {}", dir.display());
            }
        }
        PkiCmd::Revoke { dir, name, cert } => {
            let (file, note) = match (&name, cert) {
                (_, Some(c)) => (c, String::new()),
                (Some(n), None) => (crate::pki::parent_files(&dir, n).0, n.clone()),
                (None, None) => anyhow::bail!("give a parent name or --cert FILE"),
            };
            let der = crate::revoked::cert_der(&file)?;
            let fp = hex::encode(crate::revoked::revoke(&dir, &der, &note)?);
            if j {
                println!(
                    "{}",
                    json!({"dir": dir, "revoked": fp, "certificate": file})
                );
            } else {
                println!(
                    "revoked {} (sha256 {fp}) in {}",
                    file.display(),
                    dir.join(crate::revoked::REVOKED_FILE).display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
