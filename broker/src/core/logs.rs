//! Guest and portion logs, to the bubble's owner only: each bubble that
//! logs gets a bounded ring of its last [`RING_LINES`] lines (each cut to
//! [`LINE_MAX`] bytes) and, while someone follows, a broadcast of new
//! ones. The VMM already limits LOG lines per second per bubble (the rest
//! are counted and dropped there); the ring bounds what the broker keeps.
//! Rings go when their bubble's record is collected.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::broadcast;

use super::{now_ms, Broker};
use crate::error::BrokerError;

/// Lines kept per bubble.
pub const RING_LINES: usize = 64;
/// Longest line kept, bytes (cut at a character boundary).
pub const LINE_MAX: usize = 256;
/// New lines a follower may fall behind before its stream ends.
const FOLLOW_CAPACITY: usize = 256;

/// One log line of a bubble.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Position in the bubble's log, from 0 (gaps: lines the ring lost).
    pub seq: u64,
    /// When the broker received it, Unix ms.
    pub at_ms: u64,
    /// The text.
    pub text: String,
}

#[derive(Default)]
struct Ring {
    lines: VecDeque<LogLine>,
    next: u64,
    follow: Option<broadcast::Sender<LogLine>>,
}

/// Every bubble's ring.
#[derive(Default)]
pub(crate) struct Logs(parking_lot::Mutex<HashMap<String, Ring>>);

fn cut(text: &str) -> String {
    let mut end = text.len().min(LINE_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl Logs {
    /// Keeps a line of bubble `id` and hands it to its followers.
    pub(crate) fn push(&self, id: &str, text: &str, at_ms: u64) {
        let mut m = self.0.lock();
        let r = m.entry(id.to_string()).or_default();
        let line = LogLine {
            seq: r.next,
            at_ms,
            text: cut(text),
        };
        r.next += 1;
        if r.lines.len() == RING_LINES {
            r.lines.pop_front();
        }
        r.lines.push_back(line.clone());
        if let Some(tx) = &r.follow {
            if tx.send(line).is_err() {
                r.follow = None;
            }
        }
    }

    /// The lines kept, and with `follow` a receiver of the next ones (no
    /// line between the two is lost or repeated: both under one lock).
    pub(crate) fn read(
        &self,
        id: &str,
        follow: bool,
    ) -> (Vec<LogLine>, Option<broadcast::Receiver<LogLine>>) {
        let mut m = self.0.lock();
        let r = m.entry(id.to_string()).or_default();
        let rx = follow.then(|| {
            r.follow
                .get_or_insert_with(|| broadcast::channel(FOLLOW_CAPACITY).0)
                .subscribe()
        });
        (r.lines.iter().cloned().collect(), rx)
    }

    /// Forgets the rings of bubbles whose records are gone (their
    /// followers' streams end).
    pub(crate) fn remove(&self, ids: &[String]) {
        let mut m = self.0.lock();
        for id in ids {
            m.remove(id);
        }
    }
}

impl Broker {
    /// Keeps a guest or portion log line of bubble `id`.
    pub(crate) fn guest_log(&self, id: &str, text: &str) {
        self.logs.push(id, text, now_ms());
    }

    /// The kept log lines of `parent`'s bubble `id`, and with `follow` a
    /// receiver of new ones; another parent's (or an unknown) bubble is
    /// NotAccessible, as everywhere.
    pub fn stream_logs(
        self: &Arc<Self>,
        parent: &str,
        id: &str,
        follow: bool,
    ) -> Result<(Vec<LogLine>, Option<broadcast::Receiver<LogLine>>), BrokerError> {
        self.owned(parent, id)?;
        Ok(self.logs.read(id, follow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_lines_cut_and_followers_miss_nothing() {
        let l = Logs::default();
        for i in 0..(RING_LINES as u64 + 10) {
            l.push("b", &format!("line {i}"), i);
        }
        let (lines, rx) = l.read("b", true);
        assert_eq!(lines.len(), RING_LINES);
        assert_eq!(lines[0].seq, 10);
        assert_eq!(
            lines.last().unwrap().text,
            format!("line {}", RING_LINES + 9)
        );
        let mut rx = rx.unwrap();
        l.push("b", &"é".repeat(LINE_MAX), 0);
        let next = rx.try_recv().unwrap();
        assert_eq!(next.seq, RING_LINES as u64 + 10);
        assert!(next.text.len() <= LINE_MAX && next.text.chars().all(|c| c == 'é'));
        // Another bubble's lines are its own.
        assert!(l.read("other", false).0.is_empty());
        l.remove(&["b".to_string()]);
        assert!(rx.try_recv().is_err());
        assert!(l.read("b", false).0.is_empty());
    }
}
