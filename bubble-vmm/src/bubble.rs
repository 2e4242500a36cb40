//! A booted guest speaking the guest ABI (`bubble-abi`): READY_EARLY, READY, CALL/REPLY, LOG, PANIC, with the
//! checks that keep a misbehaving guest from hurting anything but itself.

use std::time::{Duration, Instant};

use crate::abi::{self, MsgType};
use crate::transport::{self, GuestMessage, TransportError};
use crate::vm::{Vm, VmError};

/// Most LOG lines passed on per second; the rest are counted and dropped.
pub const LOG_LINES_PER_SEC: u32 = 100;
/// More doorbells than this within one second without a reply is a flood.
pub const FLOOD_EXITS_PER_SEC: u32 = 2000;

/// Why a bubble died. Each is final: the VMM stops the guest.
#[derive(Debug, thiserror::Error)]
pub enum BubbleError {
    /// The VM failed (triple fault, unexpected access, KVM error).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest broke the ABI.
    #[error("guest broke the ABI: {0}")]
    Protocol(String),
    /// The guest panicked.
    #[error("guest panicked: {0}")]
    Panic(String),
    /// The guest rang the doorbell too often without answering.
    #[error("exit flood: more than {FLOOD_EXITS_PER_SEC} doorbell exits within one second without an answer")]
    Flood,
    /// The host asked too early: a request before the guest finished its
    /// start-up (READY_EARLY without READY yet), or a start-up to finish
    /// that was never begun. Nothing reached the guest.
    #[error("the guest has not finished its start-up (READY_EARLY, no READY yet)")]
    NotStarted,
}

impl BubbleError {
    /// The failure kind this error stands for.
    pub fn failure_kind(&self) -> crate::control::FailureKind {
        use crate::control::FailureKind as K;
        match self {
            BubbleError::Vm(e) => e.failure_kind(),
            BubbleError::Protocol(_) => K::GuestAbi,
            BubbleError::Panic(_) => K::GuestPanic,
            BubbleError::Flood => K::ExitFlood,
            BubbleError::NotStarted => K::Internal,
        }
    }

    /// The failure reason this error stands for.
    pub fn reason(&self) -> crate::control::FailureReason {
        crate::control::FailureReason::new(self.failure_kind(), self.to_string())
    }
}

/// Result of a call that the guest answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The output.
    Output(Vec<u8>),
    /// The guest refused the request: (ABI error code, text).
    Rejected(u16, String),
    /// A portion of the call awaits an event (checked: a valid key and
    /// timeout); the call is pending until a RESUME.
    Awaiting {
        /// The key.
        key: String,
        /// Timeout, ms.
        timeout_ms: u32,
    },
}

/// A guest on a VM.
pub struct Bubble {
    vm: Vm,
    seq: u64,
    log_window: Instant,
    logs_in_window: u32,
    exits_in_window: u32,
    /// LOG lines dropped by the rate limit.
    pub logs_dropped: u64,
    /// Between READY_EARLY and READY: no request may be sent.
    starting: bool,
}

/// How a guest's boot went as far as its first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// READY: started, accepts calls (its greeting).
    Ready(String),
    /// READY_EARLY: runs, but must be resumed until READY before any call.
    Early(String),
}

impl Bubble {
    /// Wraps a prepared VM (not yet run).
    pub fn new(vm: Vm) -> Self {
        Self {
            vm,
            seq: 0,
            log_window: Instant::now(),
            logs_in_window: 0,
            exits_in_window: 0,
            logs_dropped: 0,
            starting: false,
        }
    }

    /// The VM.
    pub fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Time spent running the guest.
    pub fn run_time(&self) -> Duration {
        self.vm.run_time()
    }

    /// Runs until the guest's next non-LOG message; LOG lines go to `log`.
    fn next_message(&mut self, log: &mut dyn FnMut(&str)) -> Result<GuestMessage, BubbleError> {
        loop {
            self.vm.run_to_doorbell()?;
            if self.log_window.elapsed() >= Duration::from_secs(1) {
                self.log_window = Instant::now();
                self.logs_in_window = 0;
                self.exits_in_window = 0;
            }
            self.exits_in_window += 1;
            if self.exits_in_window > FLOOD_EXITS_PER_SEC {
                return Err(BubbleError::Flood);
            }
            let msg = transport::read_message(&self.vm).map_err(|e| match e {
                TransportError::Vm(v) => BubbleError::Vm(v),
                other => BubbleError::Protocol(other.to_string()),
            })?;
            match msg.header.msg_type {
                MsgType::Log => {
                    let text = abi::decode_text(&msg.payload)
                        .map_err(|e| BubbleError::Protocol(format!("LOG: {e}")))?;
                    if self.logs_in_window < LOG_LINES_PER_SEC {
                        self.logs_in_window += 1;
                        log(text);
                    } else {
                        self.logs_dropped += 1;
                    }
                }
                MsgType::Panic => {
                    let text = String::from_utf8_lossy(
                        &msg.payload[..msg.payload.len().min(abi::MAX_TEXT_LEN)],
                    )
                    .into_owned();
                    return Err(BubbleError::Panic(text));
                }
                _ => {
                    self.exits_in_window = 0;
                    return Ok(msg);
                }
            }
        }
    }

    /// Runs the guest until READY (through READY_EARLY and the rest of
    /// its start-up, if it says READY_EARLY); returns its greeting.
    pub fn boot(&mut self, log: &mut dyn FnMut(&str)) -> Result<String, BubbleError> {
        match self.boot_early(log)? {
            Boot::Ready(greeting) => Ok(greeting),
            Boot::Early(_) => self.finish_start(log),
        }
    }

    /// Runs the guest until its first message: READY, or READY_EARLY
    /// (then it runs but must finish its start-up, [`Bubble::finish_start`],
    /// before it is sent any request).
    pub fn boot_early(&mut self, log: &mut dyn FnMut(&str)) -> Result<Boot, BubbleError> {
        let m = self.next_message(log)?;
        let early = match m.header.msg_type {
            MsgType::Ready => false,
            MsgType::ReadyEarly => true,
            other => {
                return Err(BubbleError::Protocol(format!(
                    "expected READY or READY_EARLY at boot, got {other:?}"
                )))
            }
        };
        self.starting = early;
        let greeting = abi::decode_text(&m.payload)
            .map(str::to_string)
            .map_err(|e| BubbleError::Protocol(format!("{}: {e}", m.header.msg_type.name())))?;
        Ok(if early {
            Boot::Early(greeting)
        } else {
            Boot::Ready(greeting)
        })
    }

    /// After READY_EARLY: resumes the guest (no request in the mailbox)
    /// until its READY; anything else breaks the ABI.
    pub fn finish_start(&mut self, log: &mut dyn FnMut(&str)) -> Result<String, BubbleError> {
        if !self.starting {
            return Err(BubbleError::NotStarted);
        }
        let m = self.next_message(log)?;
        if m.header.msg_type != MsgType::Ready {
            return Err(BubbleError::Protocol(format!(
                "expected READY after READY_EARLY, got {:?}",
                m.header.msg_type
            )));
        }
        self.starting = false;
        abi::decode_text(&m.payload)
            .map(str::to_string)
            .map_err(|e| BubbleError::Protocol(format!("READY: {e}")))
    }

    /// Payload capacity of the mailbox.
    pub fn capacity(&self) -> usize {
        transport::capacity(self.vm.layout())
    }

    /// Sends a plain (unsigned) CALL and runs the guest until it answers.
    pub fn call(
        &mut self,
        op: &str,
        input: &[u8],
        log: &mut dyn FnMut(&str),
    ) -> Result<Answer, BubbleError> {
        self.call_with(&abi::Call::plain(op, input), log)
    }

    /// Sends a CALL (with its flags) and runs the guest until it answers.
    pub fn call_with(
        &mut self,
        call: &abi::Call<'_>,
        log: &mut dyn FnMut(&str),
    ) -> Result<Answer, BubbleError> {
        // A guest between READY_EARLY and READY never sees a request.
        if self.starting {
            return Err(BubbleError::NotStarted);
        }
        self.seq += 1;
        // The broker's `resume` CALL reaches the guest as a RESUME message.
        let written = if call.op == abi::OP_RESUME {
            transport::write_resume(&self.vm, self.seq, call.input)
        } else {
            transport::write_call(&self.vm, self.seq, call)
        };
        written.map_err(|e| match e {
            TransportError::Vm(v) => BubbleError::Vm(v),
            other => BubbleError::Protocol(other.to_string()),
        })?;
        let m = self.next_message(log)?;
        match m.header.msg_type {
            MsgType::Reply => Ok(Answer::Output(m.payload)),
            MsgType::ErrorReply => {
                let (code, text) = abi::decode_error(&m.payload)
                    .map_err(|e| BubbleError::Protocol(format!("ERROR_REPLY: {e}")))?;
                Ok(Answer::Rejected(code, text.to_string()))
            }
            MsgType::Awaiting => {
                let a = abi::Awaiting::decode(&m.payload)
                    .map_err(|e| BubbleError::Protocol(format!("AWAITING: {e}")))?;
                Ok(Answer::Awaiting {
                    key: a.key.to_string(),
                    timeout_ms: a.timeout_ms,
                })
            }
            other => Err(BubbleError::Protocol(format!(
                "expected REPLY, ERROR_REPLY or AWAITING, got {other:?}"
            ))),
        }
    }
}
