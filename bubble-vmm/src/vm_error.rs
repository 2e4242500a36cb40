//! Errors creating or running a VM: the bottom of the VM layer, shared by
//! [`crate::vm`], [`crate::memory`], [`crate::load`], [`crate::transport`]
//! and [`crate::shared_image`] (none of which it imports).

use crate::layout;

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The image or layout is invalid.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}")]
    TripleFault {
        /// Guest RIP when it happened.
        rip: u64,
    },
    /// The guest touched an address or port it must not.
    #[error("guest accessed {what} at {addr:#x}, which is not part of the bubble ABI")]
    UnexpectedAccess {
        /// MMIO read/write or port I/O.
        what: &'static str,
        /// Address or port.
        addr: u64,
    },
    /// KVM reported an exit the VMM does not handle.
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
    /// The run was interrupted on request (deadline).
    #[error("vCPU interrupted")]
    Interrupted,
}

impl VmError {
    /// The failure kind this error stands for when it ends a bubble.
    pub fn failure_kind(&self) -> crate::control::FailureKind {
        use crate::control::FailureKind as K;
        match self {
            VmError::TripleFault { .. } => K::TripleFault,
            VmError::UnexpectedAccess { .. } | VmError::UnexpectedExit(_) => K::GuestAbi,
            VmError::Layout(_) => K::Setup,
            VmError::Kvm { .. } | VmError::Memory(_) | VmError::Interrupted => K::Internal,
        }
    }
}
