//! The queue's transactions: each one write transaction, committed
//! (fsynced) before it returns.

use redb::ReadableTable;
use zeroize::Zeroizing;

use super::dead;
use super::handoff::Waiters;
use super::record::{decode_seen, encode_seen, Record};
use super::{
    ms, now_ms, storage, Inner, DEPTH, DEPTH_COUNTED, EVENTS, META, NEXT_RESULT, NEXT_SEQ, ORDER,
    RESULTS, SEEN,
};
use crate::event::{Completed, EventError, EventKey, Outcome, Published, SourceEvent};

/// How a delivery is settled.
#[derive(Debug)]
pub(super) enum Settle {
    /// Done.
    Ack,
    /// Again after this many milliseconds.
    Retry(u64),
    /// To the dead-letter table, with this reason.
    Dead(Vec<u8>),
    /// Handed over but never taken (`handoff`): ready again at once, the
    /// delivery not counted.
    Release,
}

fn next(meta: &mut redb::Table<'_, &str, u64>, name: &str) -> Result<u64, EventError> {
    let n = meta
        .get(name)
        .map_err(storage("read counter"))?
        .map(|v| v.value())
        .unwrap_or(1);
    meta.insert(name, n + 1).map_err(storage("write counter"))?;
    Ok(n)
}

/// Adds one (`up`) or takes one from `subject`'s pending count.
fn count(
    depth: &mut redb::Table<'_, &str, u64>,
    subject: &str,
    up: bool,
) -> Result<(), EventError> {
    let n = depth
        .get(subject)
        .map_err(storage("read count"))?
        .map_or(0, |v| v.value());
    let n = if up { n + 1 } else { n.saturating_sub(1) };
    if n == 0 {
        depth.remove(subject).map_err(storage("write count"))?;
    } else {
        depth.insert(subject, n).map_err(storage("write count"))?;
    }
    Ok(())
}

/// Creates the META and DEPTH tables and, once (a queue made before
/// DEPTH existed), counts DEPTH from the events table, in `txn`.
pub(super) fn count_depths(txn: &redb::WriteTransaction) -> Result<(), EventError> {
    let mut meta = txn.open_table(META).map_err(storage("create tables"))?;
    let mut depth = txn.open_table(DEPTH).map_err(storage("create tables"))?;
    if meta.get(DEPTH_COUNTED).map_err(storage("read"))?.is_some() {
        return Ok(());
    }
    let events = txn.open_table(EVENTS).map_err(storage("open"))?;
    for row in events.iter().map_err(storage("scan"))? {
        let (_, v) = row.map_err(storage("scan"))?;
        let subject = Record::subject_of(v.value())?;
        let subject = std::str::from_utf8(subject).map_err(|_| EventError::Corrupt("subject"))?;
        count(&mut depth, subject, true)?;
    }
    meta.insert(DEPTH_COUNTED, 1).map_err(storage("write"))?;
    Ok(())
}

/// Stores `outcome` for `key` in `txn` unless the key has a result.
fn result_in(
    txn: &redb::WriteTransaction,
    key: &EventKey,
    outcome: &[u8],
) -> Result<Published, EventError> {
    let mut results = txn.open_table(RESULTS).map_err(storage("open"))?;
    let existing = results
        .get(key.as_str())
        .map_err(storage("read"))?
        .map(|v| v.value().get(..8).map(super::record_position));
    Ok(match existing {
        Some(pos) => Published {
            position: pos.ok_or(EventError::Corrupt("result"))?,
            duplicate: true,
        },
        None => {
            let mut meta = txn.open_table(META).map_err(storage("open"))?;
            let position = next(&mut meta, NEXT_RESULT)?;
            let mut row = position.to_le_bytes().to_vec();
            row.extend(outcome);
            results
                .insert(key.as_str(), row.as_slice())
                .map_err(storage("insert"))?;
            Published {
                position,
                duplicate: false,
            }
        }
    })
}

impl Inner {
    /// Stores `rec` (unless its key is a duplicate, or `limit` events of
    /// its subject are pending), leased to a waiting fetch if there is
    /// one, and hands it to that fetch once committed. Also answers
    /// whether other fetches should be woken (a new event nobody took).
    pub(super) fn publish(
        &self,
        mut rec: Record,
        limit: Option<u64>,
    ) -> Result<(Published, bool), EventError> {
        let window = ms(self.cfg.dedup_window);
        let (key, subject, published) = (rec.key.clone(), rec.subject.clone(), rec.published);
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        let (out, slot) = {
            let mut seen = txn.open_table(SEEN).map_err(storage("open"))?;
            let mut order = txn.open_table(ORDER).map_err(storage("open"))?;
            // Forget keys older than the window (oldest first).
            let old: Vec<(u64, String)> = {
                let mut old = Vec::new();
                for row in order.iter().map_err(storage("scan"))? {
                    let (pos, k) = row.map_err(storage("scan"))?;
                    let k = k.value().to_owned();
                    let at = match seen.get(k.as_str()).map_err(storage("read"))? {
                        Some(v) => decode_seen(v.value())?.1,
                        None => 0,
                    };
                    if at.saturating_add(window) > published {
                        break;
                    }
                    old.push((pos.value(), k));
                }
                old
            };
            for (pos, k) in old {
                order.remove(pos).map_err(storage("prune"))?;
                seen.remove(k.as_str()).map_err(storage("prune"))?;
            }
            let prior = match seen.get(key.as_str()).map_err(storage("read"))? {
                Some(v) => Some(decode_seen(v.value())?.0),
                None => None,
            };
            if let Some(position) = prior {
                let dup = Published {
                    position,
                    duplicate: true,
                };
                (dup, None)
            } else {
                let mut depth = txn.open_table(DEPTH).map_err(storage("open"))?;
                let pending = depth
                    .get(subject.as_str())
                    .map_err(storage("read count"))?
                    .map_or(0, |v| v.value());
                if let Some(limit) = limit.filter(|l| pending >= *l) {
                    // Dropping the transaction aborts it: nothing stored.
                    return Err(EventError::Backlog { pending, limit });
                }
                count(&mut depth, &subject, true)?;
                let mut meta = txn.open_table(META).map_err(storage("open"))?;
                let position = next(&mut meta, NEXT_SEQ)?;
                // A fetch is waiting: store the event leased to it (its
                // first delivery), as `take` would have.
                let slot = Waiters::take(&self.waiters, &subject);
                if slot.is_some() {
                    rec.attempts = 1;
                    rec.not_before = now_ms().saturating_add(ms(self.cfg.ack_wait));
                }
                let bytes = Zeroizing::new(rec.encode());
                let mut events = txn.open_table(EVENTS).map_err(storage("open"))?;
                events
                    .insert(position, bytes.as_slice())
                    .map_err(storage("insert"))?;
                seen.insert(key.as_str(), &encode_seen(position, published)[..])
                    .map_err(storage("insert"))?;
                order
                    .insert(position, key.as_str())
                    .map_err(storage("insert"))?;
                let new = Published {
                    position,
                    duplicate: false,
                };
                (new, slot)
            }
        };
        // An error here drops the slot: the waiting fetch looks again.
        txn.commit().map_err(storage("commit"))?;
        let Some(slot) = slot else {
            return Ok((out, !out.duplicate));
        };
        let event = SourceEvent {
            key,
            subject,
            payload: Zeroizing::new(std::mem::take(&mut rec.payload)),
            attempt: 1,
            position: out.position,
        };
        if slot.hand(event).is_err() {
            // The fetch went away: make the event ready again now.
            self.settle(out.position, 1, Settle::Release)?;
            return Ok((out, true));
        }
        Ok((out, false))
    }

    /// Takes up to `max` ready events (oldest first), counting an attempt
    /// and leasing each; events past `max_deliver` go to the dead-letter
    /// table. Also answers when the next leased event comes due. With a
    /// `subject`, only events published on exactly that subject.
    pub(super) fn take(
        &self,
        max: usize,
        subject: Option<&str>,
    ) -> Result<(Vec<SourceEvent>, Option<u64>), EventError> {
        let now = now_ms();
        let lease = ms(self.cfg.ack_wait);
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        let mut out = Vec::new();
        let mut next_due: Option<u64> = None;
        let mut changed = false;
        {
            let mut events = txn.open_table(EVENTS).map_err(storage("open"))?;
            let mut updates: Vec<(u64, Zeroizing<Vec<u8>>)> = Vec::new();
            let mut gone: Vec<(u64, Vec<u8>, String)> = Vec::new();
            for row in events.iter().map_err(storage("scan"))? {
                if out.len() + gone.len() >= max {
                    break;
                }
                let (pos, v) = row.map_err(storage("scan"))?;
                let mut rec = Record::decode(v.value())?;
                if subject.is_some_and(|s| s != rec.subject) {
                    continue;
                }
                if rec.not_before > now {
                    next_due = Some(next_due.map_or(rec.not_before, |d| d.min(rec.not_before)));
                    continue;
                }
                if rec.attempts >= self.cfg.max_deliver {
                    gone.push((pos.value(), v.value().to_vec(), rec.subject.clone()));
                    continue;
                }
                rec.attempts += 1;
                rec.not_before = now.saturating_add(lease);
                updates.push((pos.value(), Zeroizing::new(rec.encode())));
                out.push(SourceEvent {
                    key: rec.key.clone(),
                    subject: rec.subject.clone(),
                    payload: Zeroizing::new(std::mem::take(&mut rec.payload)),
                    attempt: rec.attempts,
                    position: pos.value(),
                });
            }
            for (pos, bytes) in &updates {
                events
                    .insert(*pos, bytes.as_slice())
                    .map_err(storage("lease"))?;
                changed = true;
            }
            let mut depth = txn.open_table(DEPTH).map_err(storage("open"))?;
            for (pos, rec, subject) in gone {
                count(&mut depth, &subject, false)?;
                events.remove(pos).map_err(storage("dead-letter"))?;
                dead::put(&txn, pos, &subject, b"max deliveries reached", &rec)?;
                changed = true;
            }
        }
        if changed {
            txn.commit().map_err(storage("commit"))?;
        } else {
            txn.abort().map_err(storage("abort"))?;
        }
        Ok((out, next_due))
    }

    /// Settles the delivery `attempt` of the event at `position`; refused
    /// as stale if the event was settled or handed out again since.
    pub(super) fn settle(
        &self,
        position: u64,
        attempt: u32,
        how: Settle,
    ) -> Result<(), EventError> {
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        {
            let mut events = txn.open_table(EVENTS).map_err(storage("open"))?;
            let bytes = match events.get(position).map_err(storage("read"))? {
                Some(v) => Zeroizing::new(v.value().to_vec()),
                None => return Err(EventError::Stale),
            };
            let mut rec = Record::decode(&bytes)?;
            if rec.attempts != attempt {
                return Err(EventError::Stale);
            }
            match how {
                Settle::Ack => {
                    events.remove(position).map_err(storage("ack"))?;
                    let mut depth = txn.open_table(DEPTH).map_err(storage("open"))?;
                    count(&mut depth, &rec.subject, false)?;
                }
                Settle::Retry(delay) => {
                    rec.not_before = now_ms().saturating_add(delay);
                    let b = Zeroizing::new(rec.encode());
                    events
                        .insert(position, b.as_slice())
                        .map_err(storage("retry"))?;
                }
                Settle::Release => {
                    rec.attempts = rec.attempts.saturating_sub(1);
                    rec.not_before = 0;
                    let b = Zeroizing::new(rec.encode());
                    events
                        .insert(position, b.as_slice())
                        .map_err(storage("release"))?;
                }
                Settle::Dead(reason) => {
                    events.remove(position).map_err(storage("dead-letter"))?;
                    let mut depth = txn.open_table(DEPTH).map_err(storage("open"))?;
                    count(&mut depth, &rec.subject, false)?;
                    dead::put(&txn, position, &rec.subject, &reason, &bytes)?;
                }
            }
        }
        txn.commit().map_err(storage("commit"))
    }

    /// Stores a result once per key.
    pub(super) fn put_result(
        &self,
        key: &EventKey,
        outcome: &[u8],
    ) -> Result<Published, EventError> {
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        let out = result_in(&txn, key, outcome)?;
        txn.commit().map_err(storage("commit"))?;
        Ok(out)
    }

    /// Stores the result of the delivery `attempt` of the event at
    /// `position` (once per key) and acks it, in one transaction; a stale
    /// delivery still stores its result (as `put_result` then a refused
    /// ack would) and says it did not ack.
    pub(super) fn complete(
        &self,
        position: u64,
        attempt: u32,
        key: &EventKey,
        outcome: &[u8],
    ) -> Result<Completed, EventError> {
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        let result = result_in(&txn, key, outcome)?;
        let acked = {
            let mut events = txn.open_table(EVENTS).map_err(storage("open"))?;
            let current = match events.get(position).map_err(storage("read"))? {
                Some(v) => {
                    let rec = Record::decode(v.value())?;
                    (rec.attempts == attempt).then_some(rec.subject)
                }
                None => None,
            };
            match current {
                Some(subject) => {
                    events.remove(position).map_err(storage("ack"))?;
                    let mut depth = txn.open_table(DEPTH).map_err(storage("open"))?;
                    count(&mut depth, &subject, false)?;
                    true
                }
                None => false,
            }
        };
        txn.commit().map_err(storage("commit"))?;
        Ok(Completed { result, acked })
    }

    /// See [`super::EmbeddedQueue::replay`].
    pub(super) fn replay(&self, subject: &str, key: &EventKey) -> Result<Option<u64>, EventError> {
        let txn = self.db.begin_write().map_err(storage("begin"))?;
        let out = {
            let Some(mut rec) = dead::take(&txn, subject, key)? else {
                // Dropping the transaction aborts it.
                return Ok(None);
            };
            rec.attempts = 0;
            rec.not_before = 0;
            let mut meta = txn.open_table(META).map_err(storage("open"))?;
            let position = next(&mut meta, NEXT_SEQ)?;
            let bytes = Zeroizing::new(rec.encode());
            txn.open_table(EVENTS)
                .map_err(storage("open"))?
                .insert(position, bytes.as_slice())
                .map_err(storage("replay"))?;
            count(
                &mut txn.open_table(DEPTH).map_err(storage("open"))?,
                subject,
                true,
            )?;
            let mut results = txn.open_table(RESULTS).map_err(storage("open"))?;
            let failed = match results.get(key.as_str()).map_err(storage("read"))? {
                Some(v) => matches!(
                    v.value().get(8..).map(Outcome::decode),
                    Some(Ok(Outcome::Failed(_)))
                ),
                None => false,
            };
            if failed {
                results.remove(key.as_str()).map_err(storage("replay"))?;
            }
            Some(position)
        };
        txn.commit().map_err(storage("commit"))?;
        Ok(out)
    }
}
