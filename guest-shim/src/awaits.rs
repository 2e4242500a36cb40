//! `await_event`: a portion waits for an event inside its call.
//!
//! The wasm call's state never leaves the bubble: the host function
//! answers the pending CALL with AWAITING from right here, deep in the
//! portion's stack, and the doorbell exit that sends it is also where the
//! vCPU waits. The host may freeze the bubble at that exit (the snapshot
//! holds this stack) and restore it anywhere; the next message it places
//! is read here. A RESUME returns to the portion; anything else is
//! refused with AWAITING (the call stays pending), so no other call runs
//! on the bubble while one awaits, and there is at most one await.

use alloc::vec::Vec;

use bubble_abi::{self as abi, Awaiting, MsgType, Resume};

/// How an await ended.
pub enum AwaitEnd {
    /// The event came: its payload.
    Event(Vec<u8>),
    /// The timeout passed.
    Timeout,
}

/// Sends AWAITING for `key` and waits for the RESUME. `None` if the key
/// or timeout is invalid (nothing was sent) or there is no mailbox.
pub fn await_event(key: &str, timeout_ms: u32) -> Option<AwaitEnd> {
    let mut mb = crate::mailbox()?;
    let n = Awaiting { key, timeout_ms }
        .encode_into(mb.payload())
        .ok()?;
    mb.send(MsgType::Awaiting, n);
    loop {
        let Some(h) = mb.header() else {
            mb.send_error(abi::code::BAD_INPUT, "malformed request header");
            continue;
        };
        match h.msg_type {
            MsgType::Resume => {
                let len = h.length as usize;
                match Resume::decode(&mb.payload()[..len]) {
                    Ok(Resume::Event(p)) => return Some(AwaitEnd::Event(p.to_vec())),
                    Ok(Resume::Timeout) => return Some(AwaitEnd::Timeout),
                    Err(_) => mb.send_error(abi::code::BAD_INPUT, "malformed RESUME payload"),
                }
            }
            MsgType::Call => mb.send_error(
                abi::code::AWAITING,
                "a portion call awaits an event: only a RESUME is taken",
            ),
            _ => mb.send_error(abi::code::BAD_INPUT, "expected a RESUME"),
        }
    }
}
