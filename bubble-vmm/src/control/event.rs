//! Events: VMM → broker, on the VMM's own initiative (request id 0).

use std::borrow::Cow;

use super::failure::FailureReason;
use super::frame::{write_frame, Kind};
use super::wire::{Cursor, DecodeError};

/// Something the VMM reports on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest is READY: `[boot_us u64]`.
    Ready {
        /// VM creation to READY, µs.
        boot_us: u64,
    },
    /// A guest log line: text.
    Log(String),
    /// The bubble failed: `[failure kind u8][detail]`.
    Failed(FailureReason),
}

impl Event {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Event::Ready { .. } => Kind::EvReady,
            Event::Log(_) => Kind::EvLog,
            Event::Failed(_) => Kind::EvFailed,
        }
    }

    /// The body.
    pub fn body(&self) -> Cow<'_, [u8]> {
        match self {
            Event::Ready { boot_us } => Cow::Owned(boot_us.to_le_bytes().to_vec()),
            Event::Log(l) => Cow::Borrowed(l.as_bytes()),
            Event::Failed(r) => {
                let mut v = Vec::with_capacity(1 + r.detail.len());
                r.put(&mut v);
                Cow::Owned(v)
            }
        }
    }

    /// Decodes an event of frame kind `kind`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        match Kind::from_u8(kind) {
            Some(Kind::EvReady) => {
                let mut c = Cursor::new(body, "EV_READY");
                let boot_us = c.u64()?;
                c.end()?;
                Ok(Event::Ready { boot_us })
            }
            Some(Kind::EvLog) => Ok(Event::Log(Cursor::new(body, "EV_LOG").text())),
            Some(Kind::EvFailed) => Ok(Event::Failed(FailureReason::get(&mut Cursor::new(
                body,
                "EV_FAILED",
            ))?)),
            _ => Err(DecodeError::UnexpectedKind(kind)),
        }
    }
}

impl Event {
    /// Writes the event (id 0).
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        write_frame(w, self.kind(), 0, &self.body())
    }
}
