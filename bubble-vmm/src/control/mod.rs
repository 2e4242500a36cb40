//! Control protocol between the broker and a VMM process, over the bubble's
//! Unix socket: one typed codec ([`Request`], [`Reply`], [`Event`]) used by
//! both sides.
//!
//! A frame is `[len u32 LE][kind u8][id u64 LE][body]`, where `len` counts
//! kind, id and body and is at most [`MAX_FRAME`]. Requests carry an id
//! chosen by the broker; the reply carries the same id. Events from the
//! VMM carry id 0. Integers are little-endian; "text" is UTF-8 to the end
//! of the body.
//!
//! | kind | direction | body |
//! |------|-----------|------|
//! | `HELLO` 0x01 | broker → VMM | expected bubble id (UTF-8) |
//! | `STATUS` 0x02 | broker → VMM | empty |
//! | `CALL` 0x03 | broker → VMM | `[deadline_ms u32][op_len u8][op][input]` |
//! | `SHUTDOWN` 0x04 | broker → VMM | empty |
//! | `CONFIGURE` 0x05 | broker → spare VMM | its arguments, NUL-separated (first frame only) |
//! | `SUSPEND` 0x06 | broker → VMM | empty (reply: `SNAPSHOT` pieces, then `SNAPSHOT_END`, or `ERROR`) |
//! | `RESTORE` 0x07 | broker → VMM (restore mode) | `[len u64]`: a snapshot of `len` bytes follows in `RESTORE_DATA` frames, streamed into guest memory |
//! | `PREFAULT` 0x08 | broker → VMM (restore mode) | `[n u32][(gpa u64, pages u64)*]` page runs to fault in (zeroes only) |
//! | `RESTORE_STATE` 0x09 | broker → VMM (restore mode) | vCPU state; the pages are already in guest memory |
//! | `MEASUREMENT` 0x0A | broker → VMM | empty (reply: `MEASUREMENT_OK`, or `ERROR`) |
//! | `RESTORE_DATA` 0x0B | broker → VMM (restore mode) | the next 1..=[`SNAPSHOT_PIECE`] bytes of the snapshot a `RESTORE` announced (same id) |
//! | `STATUS_OK` 0x81 | VMM → broker | [`Status`]: `[ready u8][failure kind u8, 0 none][boot_us u64][vcpu_us u64][pid u32][abi u16][id_len u16][id][failure detail]` |
//! | `CALL_OK` 0x82 | VMM → broker | output |
//! | `CALL_ERR` 0x83 | VMM → broker | [`CallErr`]: `[1][guest code u16][text]` rejected, `[2][text]` deadline, `[3][failure kind u8][detail]` failed, `[4][text]` bad request |
//! | `SHUTDOWN_OK` 0x84 | VMM → broker | empty |
//! | `ERROR` 0x85 | VMM → broker | `[code u8][text]` ([`ErrorCode`]): the request was refused, the bubble is unaffected |
//! | `SNAPSHOT` 0x86 | VMM → broker | the next [`SNAPSHOT_PIECE`] bytes of the snapshot (fewer only in the last piece; the broker refuses a short piece that is not the last) `[state_len u32][state][n u32][(gpa u64, page)*]` |
//! | `RESTORE_OK` 0x87 | VMM → broker | `[µs u64]` the VMM took |
//! | `PREFAULT_OK` 0x88 | VMM → broker | `[host address u64][length u64]` of guest memory, or empty |
//! | `SNAPSHOT_END` 0x89 | VMM → broker | `[pieces u64][len u64]`: the snapshot is complete (pieces sent, total bytes) |
//! | `MEASUREMENT_OK` 0x8A | VMM → broker | [`LaunchMeasurement`]: `[origin u8][digest 48]` |
//! | `EV_READY` 0xA1 | VMM → broker | `[boot_us u64]` |
//! | `EV_LOG` 0xA2 | VMM → broker | text |
//! | `EV_FAILED` 0xA3 | VMM → broker | [`FailureReason`]: `[failure kind u8][detail]` ([`FailureKind`] codes) |
//!
//! Decoders check every length and never panic; a body that does not
//! decode is a [`DecodeError`]. A snapshot never travels as one frame:
//! it is a sequence of pieces of at most [`SNAPSHOT_PIECE`] bytes under
//! one request id, so no frame grows with guest memory and every frame
//! length is checked against [`MAX_FRAME`] before it is cast to its `u32`
//! field. A `CALL_OK` body is moved into its [`Reply`] and written after
//! its head as it is; `RESTORE_DATA` bodies are streamed by the VMM
//! straight from the socket into guest memory.

mod event;
mod failure;
mod frame;
mod reply;
mod request;
mod wire;

pub use event::Event;
pub use failure::{FailureKind, FailureReason};
pub use frame::{
    head, spin_readable, write_frame, Head, Kind, PieceReader, COALESCE_MAX, HEAD_LEN, MAX_FRAME,
    SNAPSHOT_PIECE,
};
pub use reply::{CallErr, ErrorCode, GuestSpan, LaunchMeasurement, LaunchOrigin, Reply, Status};
pub use request::{decode_runs, encode_runs, Call, Request};
pub use wire::{DecodeError, EncodeError};

#[cfg(test)]
mod tests;
