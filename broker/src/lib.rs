//! `bubbled`: the broker that creates, calls and deletes bubbles (child KVM
//! VMs that only their parent can talk to), and `bubblectl`, its CLI.
//!
//! One VMM process runs per bubble; the broker spawns it by re-executing its
//! own binary with [`VMM_SUBCOMMAND`], so every binary that may start a
//! broker calls [`vmm_entry_if_requested`] first thing in `main`.
//!
//! Layout (see `docs/architecture.md`): [`api`] is the gRPC face, [`core`]
//! the bubbles and their lifecycle, [`store`] what is kept on disk and in
//! the shared store, [`obs`] metrics and signed usage, [`vmm`] the broker's
//! side of a VMM process.

pub mod admin;
pub mod api;
pub mod attest;
pub mod authority;
/// Connecting to a broker (re-exported from `bubble-client`).
pub use bubble_client::connect as client;
pub mod clock;
pub mod config;
pub mod conn_limit;
pub mod core;
pub mod ctl;
pub mod daemon;
pub mod datadir;
pub mod demo;
mod demo_await;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod identity;
pub mod idle;
pub mod kek_input;
pub mod load;
pub mod obs;
pub mod pki;
pub mod revoked;
pub mod server;
pub mod store;
pub mod vmm;
mod wrap_io;

/// First argument that turns any broker-capable binary into a VMM process.
pub const VMM_SUBCOMMAND: &str = "__vmm";

/// Runs the VMM process and exits if this process was spawned as one.
pub fn vmm_entry_if_requested() {
    let mut args = std::env::args();
    let _program = args.next();
    let mut rest = args.peekable();
    if rest.peek().map(String::as_str) == Some(VMM_SUBCOMMAND) {
        rest.next();
        let code = bubble_vmm::process::run_from_args(rest);
        std::process::exit(code);
    }
}
