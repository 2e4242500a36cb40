//! `bubble-bench`: measures bubbled against raw KVM floors in one run.
//!
//! ```text
//! cargo run --release -p bubble-bench -- [--json FILE] [--only METRIC...]
//! ```
//!
//! Floors (no broker): `raw_kvm_floor` (create VM + vCPU + memory, enter a
//! minimal CPL-3 guest, until its first exit) and `raw_exit_rtt` (one CPL-3
//! exit round trip, averaged over batches, 10,000 exits in all). Through the
//! broker (gRPC over its Unix socket): `create_to_ready` (cold
//! CreateBubble until READY), `create_then_attest` (the same, then at once
//! its first GetAttestation, which needs the guest's keys) and
//! `call_echo_64b` (Call round trip, 64-byte
//! echo; the same calls with the broker's answer polling off are the
//! baseline in the same run). Prints p50/p99 and the ratios to the floors;
//! `--json` writes an object keyed by metric with `p50_us`, `p99_us` and
//! `n`. `jail_setup`: the VMM jail's own cost on a fresh start, as the
//! VMM logs it. `restore_64m` (`--restores` samples) writes guest memory
//! directly, or over the VMM's socket with `--restore-over-socket`;
//! `restore_refusal`: refused imports of an unknown id, a copy under
//! another key and a damaged copy, interleaved, p50/p99 of each.
//! `set_policy_guest`: the guest's `set_policy` in process, no broker.
//! `security_accounting`: the broker's per-call security accounting,
//! timed in process (`docs/performance.md` says what each covers).
//!
//! The broker runs in this process on a runtime of its own (one worker per
//! core, as `bubbled` has) and the client on a current-thread runtime,
//! like a parent process of its own: sharing one runtime made client and
//! broker tasks compete for the same two threads.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};

mod broker;
mod floors;
mod guest_policy;
mod stats;
mod steps;

use stats::{print_results, round, us};

#[derive(Debug, Parser)]
#[command(name = "bubble-bench")]
struct Opts {
    /// Write results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these metrics (default: all).
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Samples for create_to_ready.
    #[arg(long, default_value_t = 40)]
    creates: usize,
    /// Samples for call_echo_64b.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// The program the embedded broker starts VMMs with (default: this
    /// bench itself). Give `target/release/bubbled` to measure VMMs as a
    /// deployed broker runs them: memory per VMM depends on the binary
    /// (its relocated read-only data is private to each process).
    #[arg(long)]
    vmm_program: Option<PathBuf>,
    /// Samples for suspend_64m and restore_64m.
    #[arg(long, default_value_t = 100)]
    restores: usize,
    /// Restores send the snapshot over the VMM's socket (the fallback
    /// where direct guest-memory writes are refused).
    #[arg(long)]
    restore_over_socket: bool,
    /// When a create that took a spare VMM starts the next one: `taken`,
    /// `configured` or `ready` (the broker's default).
    #[arg(long, default_value = "ready")]
    refill_after: String,
    /// Make each parent's cgroups (and write its limit) on every create,
    /// as before they were kept.
    #[arg(long)]
    no_parent_cache: bool,
}

/// The metrics measured without a broker.
const FLOORS: &[&str] = &[
    "raw_kvm_floor",
    "raw_exit_rtt",
    "verify_report",
    "jail_setup",
    "set_policy_guest",
];

fn main() -> anyhow::Result<()> {
    bubbled::vmm_entry_if_requested();
    let opts = Opts::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        bubbled::daemon::init_logging(false);
    } else {
        steps::install();
    }
    let all: Vec<&str> = FLOORS
        .iter()
        .chain(broker::THROUGH_BROKER)
        .copied()
        .collect();
    for m in &opts.only {
        anyhow::ensure!(
            all.contains(&m.as_str()),
            "unknown metric {m:?}; known: {all:?}"
        );
    }
    bubble_vmm_client::set_refill_after(match opts.refill_after.as_str() {
        "taken" => bubble_vmm_client::RefillAfter::Taken,
        "configured" => bubble_vmm_client::RefillAfter::Configured,
        "ready" => bubble_vmm_client::RefillAfter::Ready,
        other => anyhow::bail!("--refill-after {other}: taken, configured or ready"),
    });
    bubble_vmm_client::cgroups::parents::set_parent_cache(!opts.no_parent_cache);
    let want = |m: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == m);
    let mut results: broker::Results = BTreeMap::new();

    if want("raw_kvm_floor") {
        results.insert("raw_kvm_floor", floors::raw_kvm_floor()?);
    }
    if want("raw_exit_rtt") {
        results.insert("raw_exit_rtt", floors::raw_exit_rtt()?);
    }
    if want("verify_report") {
        results.insert("verify_report", floors::verify_report()?);
    }
    if want("jail_setup") {
        results.insert("jail_setup", floors::jail_setup()?);
    }
    if want("set_policy_guest") {
        results.insert("set_policy_guest", guest_policy::set_policy_guest()?);
    }
    if broker::THROUGH_BROKER.iter().any(|m| want(m)) {
        // The broker runs on a runtime of its own (see EmbeddedBroker); the
        // parent (this client) on a current-thread runtime, as a separate
        // parent process would.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(broker::through_broker(&opts, &want, &mut results))?;
    }

    print_results(&results);
    if let Some(path) = &opts.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// Writes the results as an object keyed by metric with `p50_us`, `p99_us`,
/// `n` and the metric's extras.
fn write_json(path: &std::path::Path, results: &broker::Results) -> anyhow::Result<()> {
    let mut obj = serde_json::Map::new();
    for (k, s) in results {
        let mut m = serde_json::Map::new();
        m.insert("p50_us".into(), json!(round(us(s.p50))));
        m.insert("p99_us".into(), json!(round(us(s.p99))));
        m.insert("n".into(), json!(s.n));
        for (ek, ev) in &s.extra {
            m.insert(ek.clone(), ev.clone());
        }
        obj.insert(k.to_string(), Value::Object(m));
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(obj))? + "\n",
    )
    .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
