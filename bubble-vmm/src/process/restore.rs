//! Restore mode: a VMM that rebuilds its VM from a snapshot.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{exit_in_background, fail_then_exit, serve_all, Guest, Shared, VmmArgs, Watchdog};
use crate::bubble::Bubble;
use crate::control::{
    ErrorCode, Event, FailureKind, FailureReason, GuestSpan, Head, Kind, PieceReader, Reply,
    Request,
};
use crate::layout::Layout;
use crate::snapshot::RestoreError;
use crate::vm::{self, Vm, VmError};

/// Restore mode: map guest memory and create the KVM VM (on a helper
/// thread) at once, while the broker fetches and verifies the frozen
/// copy; fault in the pages it names (PREFAULT); then stream the snapshot
/// from the first connection straight into guest memory (no boot: the
/// guest resumes where it stopped, in its doorbell exit), then serve as
/// usual.
pub(super) fn restore_thread(
    args: VmmArgs,
    shared: Arc<Shared>,
    conns: mpsc::Receiver<UnixStream>,
) {
    let started = Instant::now();
    let (restored, deadline_thread) = restore_deadline(args.restore_deadline);
    let mut deadline_thread = Some(deadline_thread);
    let mem_size = u64::from(args.memory_mib) << 20;
    // Guest memory now (prefaulting needs it); the KVM VM and vCPU on a
    // helper thread meanwhile (about a millisecond of work).
    let shell = std::thread::spawn(vm::VmShell::new);
    let memory = vm::anon_memory(mem_size);
    let Ok(conn) = conns.recv() else { return };
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    // Large socket reads: the snapshot is the one big message.
    let mut reader = io::BufReader::with_capacity(256 << 10, reader);
    {
        let mut c = shared.conn.lock();
        *c = Some(conn.try_clone().unwrap_or(conn));
    }
    let mut prepared = Some((shell, memory));
    let guest = loop {
        let Ok(head) = Head::read(&mut reader) else {
            return;
        };
        let reply = |r: Reply| shared.reply(head.id, &r);
        let Ok(body) = head.read_body(&mut reader) else {
            return;
        };
        // What fills guest memory: the vCPU state alone (the broker wrote
        // the pages), or a snapshot streamed in RESTORE_DATA pieces.
        let how = match Request::decode(head.kind, &body) {
            Ok(Request::Hello { bubble_id }) if bubble_id != args.bubble_id => {
                reply(Reply::error(
                    ErrorCode::WrongBubble,
                    "this VMM runs another bubble",
                ));
                return;
            }
            Ok(Request::Hello { .. } | Request::Status) => {
                let st = shared.status.lock().clone();
                reply(Reply::StatusOk(st));
                continue;
            }
            Ok(Request::Prefault { runs }) => {
                // Fault in the pages the snapshot will fill while the
                // broker still fetches and verifies it.
                match prepared.as_ref().map(|p| &p.1) {
                    Some(Ok(memory)) if crate::snapshot::check_runs(&runs, mem_size) => {
                        for (g, n) in runs {
                            vm::populate(memory, (0..n).map(|k| g + k * crate::layout::PAGE));
                        }
                        let span = vm::host_span(memory).map(|(host, len)| GuestSpan {
                            host: host as u64,
                            len: len as u64,
                        });
                        reply(Reply::PrefaultOk(span));
                    }
                    _ => reply(Reply::error(ErrorCode::Malformed, "malformed PREFAULT")),
                }
                continue;
            }
            Ok(Request::Shutdown) => {
                // The restore was called off (e.g. the frozen copy did
                // not verify): no guest byte was ever received.
                reply(Reply::ShutdownOk);
                exit_in_background();
            }
            Ok(Request::RestoreState { .. }) => Fill::State(body),
            Ok(Request::Restore { len }) => Fill::Stream(len),
            Ok(_) => {
                reply(Reply::error(ErrorCode::Unexpected, "expected RESTORE"));
                continue;
            }
            Err(e) => {
                reply(Reply::error(ErrorCode::Malformed, e.to_string()));
                continue;
            }
        };
        let t_restore = Instant::now();
        let _ = restored.send(());
        // Gone before the guest runs: it has no filter of its own.
        if let Some(t) = deadline_thread.take() {
            let _ = t.join();
        }
        let built = match prepared.take() {
            Some((shell, memory)) => (|| {
                let shell = shell
                    .join()
                    .map_err(|_| VmError::Memory("VM creation panicked".into()))??;
                let placeholder = Layout::new(
                    mem_size,
                    crate::layout::IMAGE_BASE + crate::layout::PAGE,
                    4096,
                )
                .map_err(VmError::from)?;
                let mut vm = Vm::from_shell(shell, memory?, &placeholder)?;
                match &how {
                    // The broker wrote the verified pages into guest memory.
                    Fill::State(state) => crate::snapshot::restore_state(&mut vm, state)?,
                    Fill::Stream(len) => {
                        let body_len = usize::try_from(*len)
                            .map_err(|_| RestoreError::Malformed("snapshot length"))?;
                        let mut pieces =
                            PieceReader::new(&mut reader, Kind::RestoreData, head.id, *len);
                        crate::snapshot::restore_from(&mut vm, &mut pieces, body_len)?
                    }
                }
                Ok(vm)
            })(),
            None => Err(RestoreError::Malformed("second RESTORE")),
        };
        let mut vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                // The stream position is lost (or the VM is unusable): fail.
                // Refuse the rest of the body so the sender stops at once.
                let _ = reader.get_ref().shutdown(std::net::Shutdown::Read);
                let detail = format!("restore failed: {e}");
                reply(Reply::error(ErrorCode::Restore, detail.clone()));
                fail_then_exit(&shared, FailureReason::new(FailureKind::Restore, detail));
                return;
            }
        };
        let dog = Watchdog::start(&mut vm);
        let boot_us = started.elapsed().as_micros() as u64;
        {
            let mut s = shared.status.lock();
            s.ready = true;
            s.boot_us = boot_us;
        }
        // The rest of this connection, served once restored (taken before
        // the seal: the vCPU thread may not duplicate descriptors).
        let rest = reader.get_ref().try_clone().ok();
        // Jailed before READY: this thread runs the vCPU and seals itself
        // once every other thread has, before the broker hears RESTORE_OK.
        if let Err(e) = super::seal_vcpu() {
            fail_then_exit(
                &shared,
                FailureReason::new(FailureKind::Jail, format!("jail: {e}")),
            );
            return;
        }
        // The answer carries how long the VMM took (µs), for the logs.
        let took = t_restore.elapsed().as_micros() as u64;
        reply(Reply::RestoreOk { took_us: took });
        shared.event(&Event::Ready { boot_us });
        break (
            Guest {
                bubble: Bubble::new(vm),
                dog,
                shared: shared.clone(),
            },
            rest,
        );
    };
    let (mut guest, rest) = guest;
    // The broker sends nothing before RESTORE_OK, so nothing is buffered.
    if !reader.buffer().is_empty() {
        fail_then_exit(
            &shared,
            FailureReason::new(
                FailureKind::ControlProtocol,
                "protocol error: request pipelined behind RESTORE",
            ),
        );
        return;
    }
    // The rest of this connection, then any later ones.
    serve_all(rest, conns, Some(&mut guest), &args.bubble_id, &shared);
}

/// What fills a restoring VM's memory.
enum Fill {
    /// The vCPU state; the broker wrote the pages into guest memory.
    State(Vec<u8>),
    /// A snapshot of this many bytes, in `RESTORE_DATA` frames.
    Stream(u64),
}

/// Ends the process unless told within `deadline` that the snapshot came:
/// a broker that died (or gave up) before sending it never will, and the
/// VMM would hold its memory and KVM VM forever. Returns the sender to
/// tell it with; dropping it unsent ends the process at once.
fn restore_deadline(deadline: Duration) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || match rx.recv_timeout(deadline) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            eprintln!(
                "bubble-vmm: no snapshot within {} ms of starting in restore mode; exiting",
                deadline.as_millis()
            );
            std::process::exit(4);
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => std::process::exit(4),
    });
    (tx, t)
}
