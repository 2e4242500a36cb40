//! The doorbell: a 32-bit guest write to [`layout::DOORBELL_GPA`] (see
//! [`crate::transport`] for the whole transport).

use crate::layout;

/// A doorbell ring: the 32-bit value the guest wrote (its sequence number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbell(pub u32);

/// Recognizes a doorbell write; anything else is not part of the ABI.
pub fn doorbell_write(addr: u64, data: &[u8]) -> Option<Doorbell> {
    if addr != layout::DOORBELL_GPA || data.len() != 4 {
        return None;
    }
    Some(Doorbell(u32::from_le_bytes([
        data[0], data[1], data[2], data[3],
    ])))
}
