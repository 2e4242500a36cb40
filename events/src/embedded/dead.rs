//! The dead-letter table and its index by subject: a dead letter is a row
//! of `DEAD` (position → reason length, reason, record) and a key
//! `(subject, position)` of `DEAD_BY_SUBJECT`, written and removed in the
//! same transaction, so listing or replaying one subject's dead letters
//! reads that subject's rows only (subjects are per tenant: the broker
//! namespaces them by owner), never another tenant's. A queue file
//! written before the index is indexed once, on open.

use redb::{ReadableTable, TableDefinition};

use super::record::Record;
use super::{storage, DeadLetter, DEAD, META};
use crate::event::{EventError, EventKey};

/// `(subject, position)` of every dead letter.
const DEAD_BY_SUBJECT: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("dead_by_subject_v1");
/// Set once the dead letters were indexed.
const DEAD_INDEXED: &str = "dead_indexed";

/// One stored dead letter: (reason, record).
fn parse(v: &[u8]) -> Result<(&[u8], Record), EventError> {
    let (len, rest) = v.split_first().ok_or(EventError::Corrupt("dead letter"))?;
    let (reason, rec) = rest
        .split_at_checked(usize::from(*len))
        .ok_or(EventError::Corrupt("dead letter"))?;
    Ok((reason, Record::decode(rec)?))
}

/// A dead letter's row: reason (at most 255 bytes) and the record.
fn row(reason: &[u8], rec: &[u8]) -> Vec<u8> {
    let len = reason.len().min(255);
    let mut v = Vec::with_capacity(1 + len + rec.len());
    v.push(u8::try_from(len).unwrap_or(u8::MAX));
    v.extend(&reason[..len]);
    v.extend(rec);
    v
}

/// Creates the index and, once, indexes the dead letters already there.
pub(super) fn index_once(txn: &redb::WriteTransaction) -> Result<(), EventError> {
    let mut meta = txn.open_table(META).map_err(storage("create tables"))?;
    let mut index = txn
        .open_table(DEAD_BY_SUBJECT)
        .map_err(storage("create tables"))?;
    if meta.get(DEAD_INDEXED).map_err(storage("read"))?.is_some() {
        return Ok(());
    }
    let dead = txn.open_table(DEAD).map_err(storage("open"))?;
    for r in dead.iter().map_err(storage("scan"))? {
        let (pos, v) = r.map_err(storage("scan"))?;
        let (_, rec) = parse(v.value())?;
        index
            .insert((rec.subject.as_str(), pos.value()), ())
            .map_err(storage("index"))?;
    }
    meta.insert(DEAD_INDEXED, 1).map_err(storage("write"))?;
    Ok(())
}

/// Stores the event at `position` (its encoded record `rec`, on
/// `subject`) as a dead letter with `reason`, in `txn`.
pub(super) fn put(
    txn: &redb::WriteTransaction,
    position: u64,
    subject: &str,
    reason: &[u8],
    rec: &[u8],
) -> Result<(), EventError> {
    txn.open_table(DEAD)
        .map_err(storage("open"))?
        .insert(position, row(reason, rec).as_slice())
        .map_err(storage("dead-letter"))?;
    txn.open_table(DEAD_BY_SUBJECT)
        .map_err(storage("open"))?
        .insert((subject, position), ())
        .map_err(storage("dead-letter"))?;
    Ok(())
}

/// The positions of `subject`'s dead letters, oldest first.
fn positions<T: ReadableTable<(&'static str, u64), ()>>(
    index: &T,
    subject: &str,
) -> Result<Vec<u64>, EventError> {
    let mut out = Vec::new();
    for r in index
        .range((subject, 0)..=(subject, u64::MAX))
        .map_err(storage("scan"))?
    {
        out.push(r.map_err(storage("scan"))?.0.value().1);
    }
    Ok(out)
}

/// `subject`'s dead letters (all of them with `None`), oldest first.
pub(super) fn list(
    txn: &redb::ReadTransaction,
    subject: Option<&str>,
) -> Result<Vec<DeadLetter>, EventError> {
    let dead = txn.open_table(DEAD).map_err(storage("open"))?;
    let mut rows = Vec::new();
    match subject {
        Some(s) => {
            let index = txn.open_table(DEAD_BY_SUBJECT).map_err(storage("open"))?;
            for pos in positions(&index, s)? {
                let v = dead
                    .get(pos)
                    .map_err(storage("read"))?
                    .ok_or(EventError::Corrupt("dead-letter index"))?;
                rows.push(v.value().to_vec());
            }
        }
        None => {
            for r in dead.iter().map_err(storage("scan"))? {
                rows.push(r.map_err(storage("scan"))?.1.value().to_vec());
            }
        }
    }
    rows.iter()
        .map(|v| {
            let (reason, rec) = parse(v)?;
            Ok(DeadLetter {
                key: rec.key,
                subject: rec.subject,
                attempts: rec.attempts,
                reason: String::from_utf8_lossy(reason).into_owned(),
            })
        })
        .collect()
}

/// Removes `subject`'s dead letter `key` in `txn`; its record, if one.
pub(super) fn take(
    txn: &redb::WriteTransaction,
    subject: &str,
    key: &EventKey,
) -> Result<Option<Record>, EventError> {
    let mut index = txn.open_table(DEAD_BY_SUBJECT).map_err(storage("open"))?;
    let mut dead = txn.open_table(DEAD).map_err(storage("open"))?;
    for pos in positions(&index, subject)? {
        let rec = {
            let v = dead
                .get(pos)
                .map_err(storage("read"))?
                .ok_or(EventError::Corrupt("dead-letter index"))?;
            parse(v.value())?.1
        };
        if rec.key == *key {
            dead.remove(pos).map_err(storage("replay"))?;
            index.remove((subject, pos)).map_err(storage("replay"))?;
            return Ok(Some(rec));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use redb::{Database, ReadableDatabase};

    fn rec(subject: &str, key: &str) -> Vec<u8> {
        Record {
            attempts: 3,
            not_before: 0,
            published: 1,
            key: EventKey::new(key).unwrap(),
            subject: subject.into(),
            payload: b"p".to_vec(),
        }
        .encode()
    }

    fn keys(db: &Database, subject: Option<&str>) -> Vec<String> {
        let txn = db.begin_read().unwrap();
        list(&txn, subject)
            .unwrap()
            .into_iter()
            .map(|d| format!("{}/{}", d.subject, d.key.as_str()))
            .collect()
    }

    #[test]
    fn each_subject_reads_only_its_own_rows_and_old_files_are_indexed_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("q.redb")).unwrap();
        // A file from before the index: dead rows without index keys.
        let txn = db.begin_write().unwrap();
        {
            let mut dead = txn.open_table(DEAD).unwrap();
            dead.insert(1, row(b"old", &rec("a.x", "k1")).as_slice())
                .unwrap();
            dead.insert(2, row(b"old", &rec("b.x", "k1")).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        index_once(&txn).unwrap();
        put(&txn, 3, "a.x", b"new", &rec("a.x", "k2")).unwrap();
        txn.commit().unwrap();
        // Indexing again (every open) changes nothing.
        let txn = db.begin_write().unwrap();
        index_once(&txn).unwrap();
        txn.commit().unwrap();
        assert_eq!(keys(&db, Some("a.x")), ["a.x/k1", "a.x/k2"]);
        assert_eq!(keys(&db, Some("b.x")), ["b.x/k1"]);
        assert!(keys(&db, Some("a")).is_empty(), "a prefix is not a subject");
        assert_eq!(keys(&db, None).len(), 3);
        // Taking a.x's k1 leaves b.x's k1 (same key, other tenant).
        let txn = db.begin_write().unwrap();
        let k1 = EventKey::new("k1").unwrap();
        assert!(take(&txn, "a.x", &k1).unwrap().is_some());
        assert!(take(&txn, "a.x", &k1).unwrap().is_none());
        txn.commit().unwrap();
        assert_eq!(keys(&db, Some("a.x")), ["a.x/k2"]);
        assert_eq!(keys(&db, Some("b.x")), ["b.x/k1"]);
    }
}
