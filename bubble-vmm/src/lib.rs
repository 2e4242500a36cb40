//! `bubble-vmm`: one KVM VM per bubble.
//!
//! - [`layout`]: guest memory layout, initial pages and vCPU state
//!   (deterministic, so the launch measurement can be computed offline);
//! - [`load`], [`launch`]: loading a bubble's initial memory and recording
//!   its SNP launch measurement as the pages are placed;
//! - [`vm`]: the KVM VM with its single vCPU entered at CPL 3, on
//!   [`memory`] (guest memory mappings), [`vm_error`] and [`doorbell`];
//! - [`abi`] (messages, re-exported from the `bubble-abi` crate) and
//!   [`transport`] (doorbell + mailbox): the guest ABI;
//! - [`bubble`]: a guest speaking the ABI, with flood and protocol checks;
//! - [`process`], [`control`]: the VMM process per bubble and its control
//!   protocol (the broker's async client is the `bubble-vmm-client` crate);
//! - [`jail`]: what a VMM process does to confine itself (hygiene, parent
//!   death, seccomp allowlists per thread; see `docs/jail.md`);
//! - [`images`]: the guest shim and hostile test guests;
//! - [`shared_image`]: the shim laid out once in a sealed memfd that every
//!   VM maps copy-on-write;
//! - [`floor`]: raw KVM performance floors for the benchmark.

pub mod abi;
pub mod bubble;
pub mod control;
pub mod doorbell;
pub mod floor;
pub mod images;
pub mod jail;
pub mod launch;
pub mod layout;
pub mod load;
pub mod memory;
pub mod priority;
pub mod process;
pub mod shared_image;
pub mod snapshot;
pub mod transport;
pub mod vm;
pub mod vm_error;
