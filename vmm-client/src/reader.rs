//! The reader of a VMM connection: one task per client reads every frame
//! the VMM sends (answers, snapshot pieces, events) and hands each to its
//! waiter, then reports how the connection ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, watch};

use bubble_vmm::control::{Event, Head, Kind, Reply, HEAD_LEN, SNAPSHOT_PIECE};

use crate::body::{read_body, MAX_SMALL_FRAME};
use crate::client::{Pending, Readiness, VmmEvent, Waiter};
use crate::exit::{ExitWatch, VmmExit};

/// How long a closed connection waits for its process's exit status.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the reader task shares with its client.
pub(crate) struct Reader {
    pub(crate) pending: Pending,
    pub(crate) events: broadcast::Sender<VmmEvent>,
    pub(crate) exit: Arc<std::sync::OnceLock<VmmExit>>,
    pub(crate) ready_stamp: Arc<std::sync::OnceLock<Instant>>,
    pub(crate) asked: Arc<AtomicBool>,
    pub(crate) ready_tx: watch::Sender<Readiness>,
    pub(crate) exit_watch: Option<ExitWatch>,
}

/// Reads the VMM's frames until the connection ends or the VMM breaks the
/// protocol; then says why (and how the process ended, if this broker
/// spawned it) to everyone waiting.
pub(crate) async fn read_frames(mut rd: bubble_uds::ReadHalf, r: Reader) {
    let Reader {
        pending,
        events,
        exit,
        ready_stamp,
        asked,
        ready_tx,
        exit_watch,
    } = r;
    let reason = loop {
        let mut h = [0u8; HEAD_LEN];
        if rd.read_exact(&mut h).await.is_err() {
            break "VMM connection closed".to_string();
        }
        let head = match Head::parse(&h) {
            Ok(x) => x,
            Err(e) => break format!("VMM sent a bad frame: {e}"),
        };
        // A snapshot comes in pieces of at most SNAPSHOT_PIECE
        // bytes, and only while a suspend asked for one;
        // anything else is a hostile or broken VMM.
        let piece = head.kind == Kind::Snapshot as u8;
        if piece && !asked.load(Ordering::SeqCst) {
            break "VMM sent a snapshot no suspend asked for".to_string();
        }
        let limit = if piece {
            SNAPSHOT_PIECE
        } else {
            MAX_SMALL_FRAME
        };
        if head.body_len > limit {
            break format!(
                "VMM sent a {}-byte frame of kind {:#04x} (at most {limit})",
                head.body_len, head.kind
            );
        }
        // The body is read once, into its own buffer, which
        // grows only as bytes arrive: a length announced but
        // not sent costs the broker no memory.
        let Ok(body) = read_body(&mut rd, head.body_len, piece).await else {
            break "VMM connection closed".to_string();
        };
        if Kind::is_event(head.kind) {
            match Event::decode(head.kind, &body) {
                Ok(Event::Ready { boot_us }) => {
                    let _ = ready_stamp.set(Instant::now());
                    let _ = ready_tx.send(Readiness::Ready(boot_us));
                    let _ = events.send(VmmEvent::Ready { boot_us });
                }
                Ok(Event::Log(l)) => {
                    let _ = events.send(VmmEvent::Log(l));
                }
                Ok(Event::Failed(r)) => {
                    let _ = ready_tx.send(Readiness::Failed(r.clone()));
                    let _ = events.send(VmmEvent::Failed(r));
                }
                Err(e) => break format!("VMM sent a bad event: {e}"),
            }
            continue;
        }
        let answer = Reply::decode(head.kind, body);
        if let Ok(Reply::StatusOk(st)) = &answer {
            if let Some(r) = &st.failed {
                let _ = ready_tx.send(Readiness::Failed(r.clone()));
            } else if st.ready {
                ready_tx.send_if_modified(|v| {
                    if *v == Readiness::Booting {
                        let _ = ready_stamp.set(Instant::now());
                        *v = Readiness::Ready(st.boot_us);
                        true
                    } else {
                        false
                    }
                });
            }
        }
        // A piece goes to its stream and keeps it open; any
        // other answer is the last one to its request.
        let waiter = {
            let mut p = pending.lock();
            match (piece && answer.is_ok(), p.get(&head.id)) {
                (true, Some(Waiter::Stream(tx))) => Some(Waiter::Stream(tx.clone())),
                (true, _) => None,
                (false, _) => p.remove(&head.id),
            }
        };
        match waiter {
            Some(Waiter::One(tx)) => {
                let _ = tx.send(answer);
            }
            Some(Waiter::Stream(tx)) => {
                if let Err(mpsc::error::SendError(a)) = tx.send(answer).await {
                    // The receiver gave up: drop the rest.
                    pending.lock().remove(&head.id);
                    crate::stream::wipe(a);
                }
            }
            None => crate::stream::wipe(answer),
        }
    };
    // A process we spawned: say how it ended (a seccomp kill
    // above all) before waking anyone waiting on it.
    let cause = match exit_watch {
        Some(mut rx) => tokio::time::timeout(EXIT_GRACE, rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|v| v.clone())),
        None => None,
    };
    let cause = cause.unwrap_or(VmmExit::Closed(reason));
    let _ = exit.set(cause.clone());
    let reason = cause.reason();
    {
        let mut p = pending.lock();
        p.clear();
    }
    ready_tx.send_if_modified(|v| {
        if *v == Readiness::Booting {
            *v = Readiness::Failed(reason.clone());
            true
        } else {
            false
        }
    });
    let _ = events.send(VmmEvent::Exited(cause));
}
