//! `bubble-vmm`: one KVM VM per bubble.
//!
//! - [`layout`]: guest memory layout, initial pages and vCPU state
//!   (deterministic, so the launch measurement can be computed offline);
//! - [`load`], [`launch`]: loading a bubble's initial memory and recording
//!   its SNP launch measurement as the pages are placed;
//! - [`vm`]: the KVM VM with its single vCPU entered at CPL 3;
//! - [`abi`] (messages, re-exported from the `bubble-abi` crate) and
//!   [`transport`] (doorbell + mailbox): the guest ABI;
//! - [`bubble`]: a guest speaking the ABI, with flood and protocol checks;
//! - [`process`], [`control`], [`client`]: the VMM process per bubble, its
//!   control protocol and the broker's async client;
//! - [`jail`]: what a VMM process does to confine itself (hygiene, parent
//!   death, seccomp allowlists per thread; see `docs/jail.md`);
//! - [`images`]: the guest shim and hostile test guests;
//! - [`shared_image`]: the shim laid out once in a sealed memfd that every
//!   VM maps copy-on-write;
//! - [`floor`]: raw KVM performance floors for the benchmark.

pub mod abi;
pub mod bubble;
pub mod client;
pub mod control;
mod direct;
mod exit;
pub mod floor;
pub mod images;
pub mod jail;
pub mod launch;
mod launcher;
pub mod layout;
pub mod load;
mod priority;
pub mod process;
pub mod shared_image;
pub mod snapshot;
mod spawn;
pub mod transport;
pub mod vm;
mod vmm_error;
