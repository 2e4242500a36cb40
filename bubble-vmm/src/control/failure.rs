//! Why a bubble failed: a kind carried as a code on the wire, with the
//! human detail beside it.

use std::fmt;

use super::wire::{Cursor, DecodeError};

macro_rules! failure_kinds {
    ($($(#[doc = $doc:literal])* $name:ident = $code:literal, $label:literal;)*) => {
        /// What kind of failure ended a bubble (one byte on the wire).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FailureKind {
            $($(#[doc = $doc])* $name = $code,)*
        }

        impl FailureKind {
            /// Every kind, in code order.
            pub const ALL: &'static [FailureKind] = &[$(FailureKind::$name,)*];

            /// The kind of a code byte.
            pub fn from_code(c: u8) -> Option<Self> {
                match c {
                    $($code => Some(FailureKind::$name),)*
                    _ => None,
                }
            }

            /// A short stable name (metrics label).
            pub fn label(self) -> &'static str {
                match self {
                    $(FailureKind::$name => $label,)*
                }
            }
        }
    };
}

failure_kinds! {
    /// Anything else inside the VMM (a KVM or memory error).
    Internal = 1, "internal";
    /// The VM could not be built (image, layout, KVM setup).
    Setup = 2, "setup";
    /// The VMM could not confine itself (seccomp, hygiene).
    Jail = 3, "jail";
    /// The guest did not answer READY in time.
    BootTimeout = 4, "boot_timeout";
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 5, "triple_fault";
    /// The guest broke the ABI (bad message, unexpected access or exit).
    GuestAbi = 6, "guest_protocol";
    /// The guest reported a panic.
    GuestPanic = 7, "guest_panic";
    /// The guest rang the doorbell too often without answering.
    ExitFlood = 8, "exit_flood";
    /// A call overran its deadline; the VMM stopped the guest.
    Deadline = 9, "deadline";
    /// A snapshot could not be restored into the VM.
    Restore = 10, "restore";
    /// The broker broke the control protocol.
    ControlProtocol = 11, "control_protocol";
    /// The VMM was killed for a system call outside its allowlist.
    Seccomp = 12, "seccomp";
    /// The VMM was killed by another signal.
    VmmKilled = 13, "vmm_killed";
    /// The VMM exited, or its connection closed.
    VmmExited = 14, "vmm_exited";
    /// The VMM process could not be started or reached.
    SpawnFailed = 15, "spawn_failed";
    /// The broker restarted and could not take the bubble back.
    BrokerRestart = 16, "lost_on_restart";
    /// The kernel killed the VMM for going over its cgroup's memory limit.
    MemoryLimit = 17, "memory_limit";
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why a bubble failed: made where the failure happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureReason {
    /// The kind (for metrics and decisions).
    pub kind: FailureKind,
    /// Human text (for records and logs).
    pub detail: String,
}

impl FailureReason {
    /// A reason of `kind` with `detail`.
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        FailureReason {
            kind,
            detail: detail.into(),
        }
    }

    /// Appends `[kind u8][detail]`.
    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.extend_from_slice(self.detail.as_bytes());
    }

    /// Reads `[kind u8][detail]` (the rest of the body).
    pub(crate) fn get(c: &mut Cursor<'_>) -> Result<Self, DecodeError> {
        let value = c.u8()?;
        let kind = FailureKind::from_code(value).ok_or(DecodeError::Code {
            what: "failure kind",
            value,
        })?;
        Ok(FailureReason {
            kind,
            detail: c.text(),
        })
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}
