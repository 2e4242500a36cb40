//! Serving the control protocol on the vCPU thread: a call runs the guest
//! right here, without a thread hand-off.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{exit_in_background, fail_then_exit, Shared, Watchdog, DEFAULT_DEADLINE};
use crate::bubble::{Answer, Bubble, BubbleError};
use crate::control::{
    Call, CallErr, ErrorCode, Event, FailureKind, FailureReason, Head, Kind, Reply, Request,
};
use crate::snapshot::StreamError;
use crate::vm::{Vm, VmError};

/// A CALL of this op makes the VMM answer `ERROR` (as to a malformed
/// CALL) without touching the guest: for tests of the broker's handling
/// of refused requests. Never in a default build.
#[cfg(feature = "fault-injection")]
pub const FAULT_ERROR_OP: &str = "fault-injection.error-reply";

/// Streams the VM's snapshot to the broker as the answer to request `id`:
/// `SNAPSHOT` pieces, then `SNAPSHOT_END` (or `ERROR`: the bubble keeps
/// running).
fn send_snapshot(shared: &Shared, id: u64, vm: &Vm) {
    let sent = crate::snapshot::stream_snapshot(vm, |piece| {
        shared.send(|s| crate::control::write_frame(s, Kind::Snapshot, id, piece))
    });
    match sent {
        Ok(done) => shared.reply(
            id,
            &Reply::SnapshotEnd {
                pieces: done.pieces,
                len: done.len,
            },
        ),
        // The connection is gone: nobody to tell.
        Err(StreamError::Closed) => {}
        Err(e) => shared.reply(
            id,
            &Reply::error(ErrorCode::Snapshot, format!("snapshot failed: {e}")),
        ),
    }
}

/// A CALL of this op makes the VMM acknowledge a later SHUTDOWN and keep
/// running (a hostile VMM): for the test of the broker's kill after the
/// grace period. Answered like [`FAULT_ERROR_OP`]. Never in a default
/// build.
#[cfg(feature = "fault-injection")]
pub const FAULT_LINGER_OP: &str = "fault-injection.ignore-shutdown";

#[cfg(feature = "fault-injection")]
static IGNORE_SHUTDOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Serves broker connections one at a time, `first` (taken early) first.
/// Without a guest (it failed), status requests report the failure until
/// the VMM exits.
pub(super) fn serve_all(
    first: Option<UnixStream>,
    conns: mpsc::Receiver<UnixStream>,
    mut guest: Option<&mut Guest>,
    bubble_id: &str,
    shared: &Arc<Shared>,
) {
    for conn in first.into_iter().chain(conns) {
        if let Err(e) = serve(conn, guest.as_deref_mut(), bubble_id, shared) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                eprintln!("bubble-vmm: connection ended: {e}");
            }
        }
        {
            let mut c = shared.conn.lock();
            *c = None;
        }
    }
}

/// The booted guest and what guards it.
pub(super) struct Guest {
    pub(super) bubble: Bubble,
    pub(super) dog: Arc<Watchdog>,
    pub(super) shared: Arc<Shared>,
}

impl Guest {
    /// Runs one call; a fatal outcome fails the bubble and ends the process
    /// after the answer is sent (then the second value is true).
    fn call(&mut self, call: &crate::abi::Call<'_>, deadline: Duration) -> (Reply, bool) {
        let op = call.op;
        let cap = self.bubble.capacity();
        if call.encoded_len() > cap {
            let text = format!("request does not fit the mailbox ({cap} bytes)");
            return (Reply::CallErr(CallErr::BadRequest(text)), false);
        }
        if op == crate::abi::OP_RESUME && crate::abi::Resume::decode(call.input).is_err() {
            let text = "malformed RESUME payload".to_string();
            return (Reply::CallErr(CallErr::BadRequest(text)), false);
        }
        let sh = self.shared.clone();
        let mut log = move |line: &str| sh.event(&Event::Log(line.to_string()));
        self.dog.arm(deadline);
        let r = self.bubble.call_with(call, &mut log);
        self.dog.disarm();
        {
            let mut s = self.shared.status.lock();
            s.vcpu_us = self.bubble.run_time().as_micros() as u64;
        }
        match r {
            Ok(Answer::Output(out)) => (Reply::CallOk(out), false),
            Ok(Answer::Rejected(code, text)) => {
                (Reply::CallErr(CallErr::Rejected { code, text }), false)
            }
            Ok(Answer::Awaiting { key, timeout_ms }) => {
                (Reply::CallErr(CallErr::Awaiting { key, timeout_ms }), false)
            }
            Err(BubbleError::Vm(VmError::Interrupted)) if self.dog.fired.load(Ordering::SeqCst) => {
                let detail = format!(
                    "call deadline exceeded: guest did not answer {op:?} within {} ms",
                    deadline.as_millis()
                );
                fail_then_exit(
                    &self.shared,
                    FailureReason::new(FailureKind::Deadline, detail.clone()),
                );
                (Reply::CallErr(CallErr::Deadline(detail)), true)
            }
            Err(e) => {
                let reason = e.reason();
                fail_then_exit(&self.shared, reason.clone());
                (Reply::CallErr(CallErr::Failed(reason)), true)
            }
        }
    }
}

/// The answer to a CALL: the guest runs it, unless the bubble failed.
fn call(guest: &mut Option<&mut Guest>, shared: &Shared, c: Call<'_>) -> Reply {
    #[cfg(feature = "fault-injection")]
    if c.call.op == crate::jail::seccomp::FAULT_OP {
        crate::jail::seccomp::forbidden_syscall();
    }
    #[cfg(feature = "fault-injection")]
    if c.call.op == FAULT_LINGER_OP {
        IGNORE_SHUTDOWN.store(true, std::sync::atomic::Ordering::SeqCst);
        return Reply::error(
            ErrorCode::Malformed,
            "SHUTDOWN will be ignored (fault injection)",
        );
    }
    #[cfg(feature = "fault-injection")]
    if c.call.op == FAULT_ERROR_OP {
        return Reply::error(ErrorCode::Malformed, "malformed CALL (fault injection)");
    }
    let deadline = match c.deadline_ms {
        0 => DEFAULT_DEADLINE,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let failed = shared.status.lock().failed.clone();
    match (failed, guest.as_deref_mut()) {
        (None, Some(g)) => {
            let (reply, fatal) = g.call(&c.call, deadline);
            if fatal {
                *guest = None;
            }
            reply
        }
        (reason, _) => Reply::CallErr(CallErr::Failed(reason.unwrap_or_else(|| {
            FailureReason::new(FailureKind::Internal, "the bubble has no guest")
        }))),
    }
}

fn serve(
    stream: UnixStream,
    mut guest: Option<&mut Guest>,
    bubble_id: &str,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    let mut reader = io::BufReader::new(stream.try_clone()?);
    {
        let mut c = shared.conn.lock();
        *c = Some(stream);
    }
    // Poll only while requests keep coming back to back: one that took
    // longer than the budget turns polling off until one comes quickly.
    let budget = shared.poll;
    let mut poll = !budget.is_zero();
    loop {
        let idle_since = Instant::now();
        if poll && reader.buffer().is_empty() {
            poll = crate::control::spin_readable(reader.get_ref(), budget);
        }
        let head = Head::read(&mut reader)?;
        let body = head.read_body(&mut reader)?;
        if !poll && !budget.is_zero() {
            poll = idle_since.elapsed() < budget;
        }
        let reply = |r: Reply| shared.reply(head.id, &r);
        let req = match Request::decode(head.kind, &body) {
            Ok(r) => r,
            Err(e) => {
                reply(Reply::error(ErrorCode::Malformed, e.to_string()));
                continue;
            }
        };
        match req {
            Request::Hello { bubble_id: want } if want != bubble_id => {
                reply(Reply::error(
                    ErrorCode::WrongBubble,
                    "this VMM runs another bubble",
                ));
                return Ok(());
            }
            Request::Hello { .. } | Request::Status => {
                let st = shared.status.lock().clone();
                reply(Reply::StatusOk(st));
            }
            Request::Call(c) => reply(call(&mut guest, shared, c)),
            Request::Shutdown => {
                reply(Reply::ShutdownOk);
                #[cfg(feature = "fault-injection")]
                if IGNORE_SHUTDOWN.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                exit_in_background();
            }
            Request::Measurement => reply(match guest.as_deref_mut() {
                Some(g) => match g.bubble.vm().launch().answer() {
                    Some(m) => Reply::MeasurementOk(m),
                    None => Reply::error(ErrorCode::NoMeasurement, "launch measurement unknown"),
                },
                None => Reply::error(ErrorCode::NoGuest, "the bubble has no guest"),
            }),
            Request::Suspend => {
                // The vCPU is stopped in its doorbell exit (this thread runs
                // it): a safe point. The VMM keeps running until the broker
                // has stored the snapshot and sends SHUTDOWN.
                match guest.as_deref_mut() {
                    Some(g) => send_snapshot(shared, head.id, g.bubble.vm()),
                    None => reply(Reply::error(ErrorCode::NoGuest, "the bubble has no guest")),
                }
            }
            Request::Configure { .. }
            | Request::Restore { .. }
            | Request::RestoreData { .. }
            | Request::Prefault { .. }
            | Request::RestoreState { .. } => {
                reply(Reply::error(ErrorCode::Unexpected, "unknown request"))
            }
        }
    }
}
