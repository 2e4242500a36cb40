//! Guest ABI *transport*: how messages travel between a bubble and its
//! VMM on a plain KVM host.
//!
//! - **Doorbell**: a 32-bit write to [`crate::layout::DOORBELL_GPA`], an address
//!   with no memory slot, so the access exits to the VMM (KVM_EXIT_MMIO) at
//!   any CPL on every KVM backend. One doorbell = one exit: it publishes the
//!   guest's message and, because the vCPU stays stopped until the VMM has
//!   placed the next request, also waits for it.
//! - **Mailbox**: pages at the top of guest RAM ([`Layout::mailbox_gpa`]),
//!   holding one [`abi::Header`] and its payload in either direction.
//!
//! On SEV-SNP the doorbell becomes a VMGEXIT through the GHCB and the
//! mailbox pages are shared (C-bit clear); the messages in [`crate::abi`]
//! stay as they are.

use crate::abi::{self, AbiError, Header, MsgType, HEADER_LEN};
pub use crate::doorbell::{doorbell_write, Doorbell};
use crate::layout::Layout;
use crate::vm::Vm;
use crate::vm_error::VmError;

/// Errors reading or writing the mailbox.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The guest's message is malformed.
    #[error("guest message rejected: {0}")]
    Abi(AbiError),
    /// The host's message does not fit the mailbox.
    #[error("request of {len} bytes does not fit the mailbox ({cap} bytes)")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Mailbox payload capacity.
        cap: usize,
    },
    /// Guest memory access failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A message read from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestMessage {
    /// Its header.
    pub header: Header,
    /// Its payload (`header.length` bytes, copied out of guest memory).
    pub payload: Vec<u8>,
}

/// Payload capacity of a layout's mailbox.
pub fn capacity(l: &Layout) -> usize {
    (l.mailbox_size as usize).saturating_sub(HEADER_LEN)
}

/// Reads and validates the guest's message from the mailbox.
pub fn read_message(vm: &Vm) -> Result<GuestMessage, TransportError> {
    let l = *vm.layout();
    let mut h = [0u8; HEADER_LEN];
    vm.read(l.mailbox_gpa, &mut h)?;
    let header = Header::decode(&h, capacity(&l) as u64).map_err(TransportError::Abi)?;
    if !header.msg_type.from_guest() {
        return Err(TransportError::Abi(AbiError::UnknownType(
            header.msg_type as u16,
        )));
    }
    let mut payload = vec![0u8; header.length as usize];
    vm.read(l.mailbox_gpa + HEADER_LEN as u64, &mut payload)?;
    Ok(GuestMessage { header, payload })
}

/// Writes a CALL request into the mailbox.
pub fn write_call(vm: &Vm, seq: u64, call: &abi::Call<'_>) -> Result<(), TransportError> {
    let l = *vm.layout();
    let cap = capacity(&l);
    let len = call.encoded_len();
    if len > cap {
        return Err(TransportError::TooLarge { len, cap });
    }
    let mut buf = vec![0u8; len];
    call.encode_into(&mut buf).map_err(TransportError::Abi)?;
    vm.write(l.mailbox_gpa + HEADER_LEN as u64, &buf)?;
    let h = Header {
        msg_type: MsgType::Call,
        length: len as u32,
        seq,
        host_time_ns: monotonic_ns(),
    };
    vm.write(l.mailbox_gpa, &h.encode())?;
    Ok(())
}

/// Writes a RESUME message (payload: an encoded [`abi::Resume`]) into the
/// mailbox.
pub fn write_resume(vm: &Vm, seq: u64, payload: &[u8]) -> Result<(), TransportError> {
    let l = *vm.layout();
    let cap = capacity(&l);
    if payload.len() > cap {
        return Err(TransportError::TooLarge {
            len: payload.len(),
            cap,
        });
    }
    abi::Resume::decode(payload).map_err(TransportError::Abi)?;
    vm.write(l.mailbox_gpa + HEADER_LEN as u64, payload)?;
    let h = Header {
        msg_type: MsgType::Resume,
        length: payload.len() as u32,
        seq,
        // The resumed call goes on at this time (the credential rate
        // limit's clock, as for a CALL).
        host_time_ns: monotonic_ns(),
    };
    vm.write(l.mailbox_gpa, &h.encode())?;
    Ok(())
}

/// The host's `CLOCK_MONOTONIC` in ns: the guest's clock (it paces the
/// credential rate limit). Host-wide, so a bubble restored on this host by
/// another VMM process sees it continue; another host's clock may be
/// behind, which the guest's token bucket treats as no refill.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
