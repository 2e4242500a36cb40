//! `bubble-vmm-client`: the broker's async client of a bubble's VMM
//! process (the `bubble-vmm` crate), on tokio.
//!
//! - [`VmmClient`] (`client`): (re)connecting, calls, events, suspend,
//!   prefault and restore, shutdown; every frame through the typed codec
//!   of [`bubble_vmm::control`];
//! - [`Spawner`], [`spawn`] (`spawn`, `launcher`): starting VMM processes,
//!   with spares started ahead of need, all from one long-lived thread;
//! - [`SnapshotStream`] (`stream`): a suspend's snapshot piece by piece,
//!   and a restore's in `RESTORE_DATA` frames;
//! - `direct`, `procmem`: writing a snapshot's pages straight into a
//!   restoring VMM, through its memory file, bound to the process by a
//!   pidfd (never by raw pid);
//! - [`VmmExit`], [`VmmError`], [`CallError`]: how a VMM ended and what
//!   failed, typed.

mod adopted;
mod body;
pub mod cgroups;
mod charge;
mod client;
mod direct;
mod exit;
mod fds;
mod fresh;
mod inflight;
mod launcher;
mod linger;
mod paged;
mod procmem;
mod reader;
mod setup;
mod spawn;
mod stream;
mod uids;
mod upload;
mod vmm_error;

pub use bubble_vmm::control::{FailureKind, FailureReason, GuestSpan, LaunchMeasurement, Status};
pub use bubble_vmm::images::{GuestImage, HostileKind};
pub use client::{set_answer_poll, socket_path, ReadyInfo, SpawnSteps, VmmClient, VmmEvent};
pub use exit::VmmExit;
pub use fresh::spawn;
pub use paged::PageWriter;
pub use procmem::ProcHandle;
pub use procmem::WriteError;
pub use setup::SpawnConfig;
pub use spawn::{set_refill_after, JailSpec, RefillAfter, Spawner, REFILL_WAIT};
pub use stream::SnapshotStream;
pub use uids::{UidLease, UidPool};
pub use upload::RestoreUpload;
pub use vmm_error::{CallError, VmmError};
