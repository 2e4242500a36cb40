//! `bubblectl`: the command-line client of `bubbled`.
//!
//! Tables for people, `--json` for scripts. Exit codes by class and gRPC
//! status: see [`errors`] (and `bubblectl --help`).
//!
//! One module per group of subcommands, each with its arguments and its
//! handlers: `bubbles` (create, attach, list, describe, delete), `freeze`
//! (suspend, restore, frozen), `calls` (call, watch), `parent` (provision,
//! portion), `attest` (attest, measure), `pki`, `admin` (operator
//! commands), and `ops` (usage, load, demo); `output` formats bubbles and bytes for all of them, `policy`
//! reads policy files and idle settings, `trust` attests a bubble before
//! its keys are used, `errors` reports failures.

mod admin;
mod attest;
mod audit;
mod bubbles;
mod calls;
pub mod errors;
mod freeze;
mod ops;
mod output;
mod parent;
mod pki;
mod policy;
mod sealed;
mod triggers;
mod trust;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bubble_proto::v1::broker_client::BrokerClient;
use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;

use crate::client;

pub use output::state_label;

/// Command-line options of `bubblectl`.
#[derive(Debug, Parser)]
#[command(
    name = "bubblectl",
    version,
    about = "Manage bubbles (child KVM VMs) through bubbled",
    after_help = errors::EXIT_TABLE
)]
pub struct Opts {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to reach the broker.
#[derive(Debug, Args)]
struct Conn {
    /// Broker Unix socket (a broker started with --data-dir D listens on
    /// D/bubbled.sock).
    #[arg(
        long,
        global = true,
        env = "BUBBLED_SOCKET",
        default_value = "/var/lib/bubbled/bubbled.sock"
    )]
    socket: PathBuf,
    /// Use mutual TLS to this URL instead (e.g. https://localhost:7443).
    #[arg(long, global = true, env = "BUBBLED_ENDPOINT")]
    endpoint: Option<String>,
    /// PKI directory (from `bubblectl pki init`) for --endpoint.
    #[arg(long, global = true, env = "BUBBLED_PKI")]
    pki: Option<PathBuf>,
    /// Parent name whose certificate to present with --endpoint.
    #[arg(long, global = true, env = "BUBBLED_PARENT")]
    parent: Option<String>,
    /// describe/delete any parent's bubble (operators: a parent id in the
    /// broker's `admins`).
    #[arg(long, global = true)]
    admin: bool,
    /// Name the broker's certificate must carry (default: the host of
    /// --endpoint).
    #[arg(long, global = true, env = "BUBBLED_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
}

impl Conn {
    /// Connects to the broker: mutual TLS with `--endpoint`, else the Unix
    /// socket.
    async fn connect(&self) -> anyhow::Result<BrokerClient<Channel>> {
        match &self.endpoint {
            Some(url) => {
                let pki = self.pki.as_ref().context("--endpoint needs --pki DIR")?;
                let parent = self
                    .parent
                    .as_ref()
                    .context("--endpoint needs --parent NAME")?;
                let (cert, key) = crate::pki::parent_files(pki, parent);
                Ok(client::connect_tls_named(
                    url,
                    &pki.join("ca.pem"),
                    &cert,
                    &key,
                    self.tls_server_name.as_deref(),
                )
                .await?)
            }
            None => Ok(client::connect_unix(&self.socket).await?),
        }
    }
}

// The subcommands' own doc comments are their help; their argument structs
// carry none, so that clap shows exactly these.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a bubble and wait until it is READY.
    Create(bubbles::CreateArgs),
    /// Take a pre-booted bubble from a warm pool.
    Attach(bubbles::AttachArgs),
    /// Freeze a bubble to the encrypted store.
    Suspend(freeze::SuspendArgs),
    /// Resume a suspended bubble from its frozen copy.
    Restore(freeze::RestoreArgs),
    /// Frozen (suspended) bubbles.
    #[command(subcommand)]
    Frozen(freeze::FrozenCmd),
    /// Show a bubble's metered usage, signed by the broker.
    Usage(ops::UsageArgs),
    /// Run a bounded load test against a broker over mutual TLS.
    Load(ops::LoadArgs),
    /// List your bubbles.
    List(bubbles::ListArgs),
    /// Show one bubble.
    Describe(BubbleArg),
    /// Call an operation in a bubble, or a function of a loaded portion.
    Call(calls::CallArgs),
    /// Seal a credential to a bubble's attested key and provision it.
    Provision(parent::ProvisionArgs),
    /// Code portions (WebAssembly) in a bubble.
    #[command(subcommand)]
    Portion(parent::PortionCmd),
    /// Delete a bubble.
    Delete(BubbleArg),
    /// Stream state changes of your bubbles until interrupted.
    Watch(calls::WatchArgs),
    /// Print a bubble's guest and portion log lines (--follow for new ones).
    Logs(calls::LogsArgs),
    /// Development PKI for mutual TLS.
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// Attestation: fetch a bubble's report, verify reports offline.
    #[command(subcommand)]
    Attest(attest::AttestCmd),
    /// Print the launch measurement a bubble booted from an image reports,
    /// computed offline by the VMM's own loader (no KVM needed).
    Measure(attest::MeasureArgs),
    /// Your records in the broker's audit log; `audit verify FILE` checks
    /// a log offline.
    Audit(audit::AuditArgs),
    /// Operator commands (for the broker's `admins`).
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// With --admin (`bubblectl --admin events`): every parent's security
    /// events, as `admin events`.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Run the demo: a broker on embedded defaults in a temp dir, a few
    /// bubbles created, called and deleted, and a timing table.
    Demo(ops::DemoArgs),
    /// Triggers: events on a subject of yours run a portion function.
    #[command(subcommand)]
    Trigger(triggers::TriggerCmd),
    /// A key pair to receive sealed results (`call --seal-to`): writes the
    /// private key (0600), prints the public key.
    Keygen(sealed::KeygenArgs),
    /// Open a sealed result (`call --seal-to`'s envelope) with its
    /// recipient's private key.
    Open(sealed::OpenArgs),
    /// Publish an event on one of your subjects (payload from --file or
    /// standard input).
    Publish(triggers::PublishArgs),
    /// The result of one event of one of your triggers.
    Results(triggers::ResultsArgs),
    /// The answer of one of your direct calls that awaited a key (kept
    /// once the await ended; pending before).
    AwaitResult(triggers::AwaitResultArgs),
}

// The one argument of commands that name a bubble and nothing else.
#[derive(Debug, Args)]
struct BubbleArg {
    /// Bubble id.
    bubble: String,
}

/// Entry point of the `bubblectl` binary.
pub fn main() -> ExitCode {
    let opts = Opts::parse();
    if matches!(opts.cmd, Cmd::Events { .. }) && !opts.conn.admin {
        use clap::CommandFactory;
        Opts::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "`events` is an operator command: `bubblectl --admin events` \
                 (or `bubblectl admin events`)",
            )
            .exit();
    }
    let json_out = opts.json;
    // The demo's client is one parent making one call at a time: a
    // current-thread runtime (its broker has threads of its own).
    let rt = match opts.cmd {
        Cmd::Demo(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            return errors::report(
                &anyhow::Error::new(e).context("cannot start the async runtime"),
                json_out,
            )
        }
    };
    match rt.block_on(run(opts)) {
        Ok(code) => code,
        Err(e) => errors::report(&e, json_out),
    }
}

/// Runs one subcommand; its handler decides the exit code.
async fn run(opts: Opts) -> anyhow::Result<ExitCode> {
    let j = opts.json;
    let conn = &opts.conn;
    match opts.cmd {
        Cmd::Create(a) => bubbles::create(conn, a, j).await,
        Cmd::Attach(a) => bubbles::attach(conn, a, j).await,
        Cmd::List(a) => bubbles::list(conn, a, j).await,
        Cmd::Describe(a) => bubbles::describe(conn, a, j).await,
        Cmd::Delete(a) => bubbles::delete(conn, a, j).await,
        Cmd::Suspend(a) => freeze::suspend(conn, a, j).await,
        Cmd::Restore(a) => freeze::restore(conn, a, j).await,
        Cmd::Frozen(c) => freeze::frozen(conn, c, j).await,
        Cmd::Call(a) => calls::call(conn, a, j).await,
        Cmd::Watch(a) => calls::watch(conn, a, j).await,
        Cmd::Logs(a) => calls::logs(conn, a, j).await,
        Cmd::Provision(a) => parent::provision(conn, a, j).await,
        Cmd::Portion(c) => parent::portion(conn, c, j).await,
        Cmd::Pki(c) => pki::run(c, j),
        Cmd::Attest(c) => attest::run(conn, c, j).await,
        Cmd::Measure(a) => attest::measure(a, j),
        Cmd::Usage(a) => ops::usage(conn, a, j).await,
        Cmd::Load(a) => ops::load(conn, a, j).await,
        Cmd::Demo(a) => ops::demo(a).await,
        Cmd::Audit(a) => audit::run(conn, a, j).await,
        Cmd::Trigger(c) => triggers::trigger(conn, c, j).await,
        Cmd::Publish(a) => triggers::publish(conn, a, j).await,
        Cmd::Results(a) => triggers::results(conn, a, j).await,
        Cmd::AwaitResult(a) => triggers::await_result(conn, a, j).await,
        Cmd::Keygen(a) => sealed::keygen(a, j),
        Cmd::Open(a) => sealed::open(a),
        Cmd::Admin(c) => admin::run(conn, c, j).await,
        Cmd::Events { count } => admin::run(conn, admin::AdminCmd::Events { count }, j).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        Opts::try_parse_from(["bubblectl", "--json", "create", "--memory-mib", "16"]).unwrap();
        Opts::try_parse_from(["bubblectl", "call", "b-1", "echo", "--input", "hi"]).unwrap();
        assert!(Opts::try_parse_from([
            "bubblectl",
            "call",
            "b-1",
            "echo",
            "--input",
            "a",
            "--input-hex",
            "00"
        ])
        .is_err());
    }

    /// Every subcommand parses with its arguments and the global flags.
    #[test]
    fn every_subcommand_parses() {
        let lines: &[&[&str]] = &[
            &["create", "--image", "shim", "--request-id", "r"],
            &["attach", "pool-a", "--wait-ms", "5"],
            &["attach", "pool-a", "--policy-file", "p.toml", "-q"],
            &["suspend", "b-1", "--kek-file", "-"],
            &["restore", "b-1", "--generation", "3"],
            &["frozen", "list"],
            &["usage", "b-1", "--broker-key", "00"],
            &["load", "--parents", "2", "--profile", "p"],
            &["list", "--all"],
            &["describe", "b-1"],
            &["delete", "b-1"],
            &["watch", "b-1", "--count", "2"],
            &[
                "create",
                "--policy-file",
                "p.toml",
                "--idle-timeout",
                "5",
                "--idle-action",
                "suspend",
                "-q",
            ],
            &[
                "attach",
                "pool-a",
                "--idle-timeout",
                "5",
                "--idle-action",
                "delete",
                "--quiet",
            ],
            &["list", "-q"],
            &[
                "provision",
                "b-1",
                "k",
                "--from-file",
                "f",
                "--measurement",
                "00",
            ],
            &[
                "provision",
                "b-1",
                "k",
                "--from-env",
                "V",
                "--allow-sim",
                "--ark",
                "a",
            ],
            &["portion", "load", "b-1", "payments", "p.wasm"],
            &["trigger", "create", "orders", "p", "f", "--bubble", "b-1"],
            &[
                "trigger",
                "create",
                "orders",
                "p",
                "f",
                "--profile",
                "s",
                "--module",
                "m.wat",
            ],
            &["trigger", "list"],
            &["trigger", "delete", "t-1"],
            &["publish", "orders", "--key", "k", "--file", "f"],
            &["results", "t-1", "k", "--output", "hex"],
            &["await-result", "k", "--output", "hex"],
            &[
                "call",
                "b-1",
                "tokenize",
                "--portion",
                "payments",
                "--sign",
                "--expect-portion",
                "payments=p.wasm",
            ],
            &[
                "call",
                "b-1",
                "echo",
                "--seal",
                "--output",
                "raw",
                "--output-file",
                "o",
            ],
            &["call", "b-1", "echo", "--output", "hex"],
            &["pki", "init", "d", "--parents", "a,b"],
            &["pki", "add-parent", "d", "c"],
            &["attest", "verify", "--report", "r.bin"],
            &["attest", "get", "b-1", "--out", "o"],
            &["measure", "--explain"],
            &["demo", "--bubbles", "1"],
            &["audit", "--bubble", "b-1", "--since", "10m"],
            &["audit", "verify", "f", "--key", "00"],
            &["admin", "quarantine", "list"],
            &["admin", "events", "--count", "3"],
            &["--admin", "events", "--count", "3"],
            &["logs", "b-1", "--follow", "--count", "2"],
            &["admin", "quarantine", "lift", "ab", "--parent", "cert:a"],
        ];
        for line in lines {
            let argv = ["bubblectl", "--json", "--socket", "/s"]
                .iter()
                .chain(line.iter());
            let opts = Opts::try_parse_from(argv).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert!(opts.json);
        }
        assert!(Opts::try_parse_from(["bubblectl", "describe"]).is_err());
        assert!(Opts::try_parse_from(["bubblectl", "nonsense"]).is_err());
        // A credential never comes from argv, and needs exactly one source.
        assert!(Opts::try_parse_from(["bubblectl", "provision", "b-1", "k"]).is_err());
        assert!(Opts::try_parse_from([
            "bubblectl",
            "provision",
            "b-1",
            "k",
            "--from-stdin",
            "--from-env",
            "V"
        ])
        .is_err());
        // Idle timeout and action go together.
        assert!(Opts::try_parse_from(["bubblectl", "create", "--idle-timeout", "5"]).is_err());
    }
}
