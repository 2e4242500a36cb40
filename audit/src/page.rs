//! Reading the log a page at a time: a sparse index of record offsets
//! (one every [`STRIDE`] records, kept by the writer) lets a reader start
//! near any sequence number without reading the file from the start; a
//! page stops after `limit` kept records or `max_scan` records read,
//! whichever comes first, and says where the next one starts.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::{Arc, RwLock};

use crate::log::{AuditError, AuditLog};
use crate::record::{decode_frame, Frame, Record, MAX_BODY};

/// One index entry every this many records.
pub const STRIDE: u64 = 256;

/// Offsets of records `0, STRIDE, 2·STRIDE, …`, shared by the writer (which
/// extends it after each durable write) and readers.
#[derive(Clone, Default)]
pub(crate) struct Index(Arc<RwLock<Vec<u64>>>);

impl Index {
    /// The offset of record `seq` rounded down to the stride, if the log
    /// holds that many records.
    fn start(&self, seq: u64) -> Option<(u64, u64)> {
        let i = usize::try_from(seq / STRIDE).ok()?;
        let v = self.0.read().unwrap_or_else(|e| e.into_inner());
        v.get(i).map(|&off| (off, i as u64 * STRIDE))
    }

    /// Adds the offsets of records written since.
    pub(crate) fn extend(&self, offsets: impl IntoIterator<Item = u64>) {
        let mut v = self.0.write().unwrap_or_else(|e| e.into_inner());
        v.extend(offsets);
    }
}

/// One page of records.
#[derive(Debug)]
pub struct Page<T> {
    /// The records kept, oldest first.
    pub items: Vec<T>,
    /// The sequence number to ask for next (`None`: the end of the log
    /// was reached).
    pub next: Option<u64>,
}

/// Reads the next whole frame; `None` at the end (or a torn or zeroed
/// tail the writer is still filling).
fn next_frame(r: &mut impl Read) -> Result<Option<Record>, std::io::Error> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > MAX_BODY {
        return Ok(None);
    }
    let mut frame = vec![0u8; 4 + n];
    frame[..4].copy_from_slice(&len);
    match r.read_exact(&mut frame[4..]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    match decode_frame(&frame) {
        Ok(Frame::Record { record, .. }) => Ok(Some(*record)),
        _ => Ok(None),
    }
}

impl AuditLog {
    /// Records from sequence number `from` on, after a flush (so every
    /// record appended before this call is included): each read record
    /// goes through `keep`; stops after `limit` kept or `max_scan` read.
    /// Reads from the nearest indexed offset, never the whole file.
    pub fn page<T>(
        &self,
        from: u64,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(Record) -> Option<T>,
    ) -> Result<Page<T>, AuditError> {
        // A write error is reported by `lost`; the file is still readable.
        let _ = self.flush();
        let mut page = Page {
            items: Vec::new(),
            next: None,
        };
        let Some((offset, mut seq)) = self.index().start(from) else {
            return Ok(page);
        };
        let io = |source| AuditError::Io {
            path: self.path().to_path_buf(),
            source,
        };
        let mut f = File::open(self.path()).map_err(io)?;
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut r = BufReader::with_capacity(64 << 10, f);
        let mut scanned = 0usize;
        while let Some(rec) = next_frame(&mut r).map_err(io)? {
            if rec.seq != seq {
                // Not where the index said: never guess.
                return Err(AuditError::Misindexed {
                    expected: seq,
                    found: rec.seq,
                });
            }
            seq += 1;
            if rec.seq < from {
                continue;
            }
            scanned += 1;
            if let Some(t) = keep(rec) {
                page.items.push(t);
            }
            if page.items.len() >= limit.max(1) || scanned >= max_scan.max(1) {
                page.next = Some(seq);
                break;
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Options;
    use crate::record::{Entry, What};
    use ed25519_dalek::SigningKey;
    use std::time::Duration;

    use crate::test_key::Key;

    fn open(p: &std::path::Path) -> AuditLog {
        let o = Options {
            capacity: 64,
            checkpoint_every: 100,
            checkpoint_interval: Duration::from_secs(3600),
        };
        AuditLog::open(p, Arc::new(Key(SigningKey::from_bytes(&[3; 32]))), o).unwrap()
    }

    fn add(log: &AuditLog, range: std::ops::Range<u64>) {
        for i in range {
            log.append(
                Entry {
                    bubble: format!("b-{i}"),
                    owner: if i % 3 == 0 { "alice" } else { "bob" }.into(),
                    at_ms: 1 + i,
                    ..Entry::default()
                },
                What::Security { kind: "x".into() },
            );
        }
    }

    /// Pages from any point give exactly the records a full read gives,
    /// split by `limit` and `max_scan`, across a reopen (index rebuilt)
    /// and while the log grows; a page never reads the file's start.
    #[test]
    fn pages_cover_the_log_exactly_and_start_from_the_index() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit").join("audit.log");
        let log = open(&p);
        add(&log, 0..700);
        drop(log);
        let log = open(&p);
        add(&log, 700..1000);
        let all = log.read_all().unwrap();
        let alice = |r: Record| (r.entry.owner == "alice").then_some(r.seq);
        let want: Vec<u64> = all.iter().cloned().filter_map(alice).collect();
        for (limit, max_scan) in [(7, 10_000), (1000, 50), (3, 5), (1000, 10_000)] {
            let mut got = Vec::new();
            let mut from = 0;
            let mut pages = 0;
            loop {
                let pg = log.page(from, limit, max_scan, alice).unwrap();
                assert!(pg.items.len() <= limit);
                got.extend(pg.items);
                pages += 1;
                match pg.next {
                    Some(n) => from = n,
                    None => break,
                }
                assert!(pages < 2000);
            }
            assert_eq!(got, want, "limit {limit} scan {max_scan}");
        }
        // From the middle; past the end.
        let pg = log.page(601, 2, 10_000, alice).unwrap();
        let after: Vec<u64> = want.iter().copied().filter(|&s| s >= 601).take(2).collect();
        assert_eq!(pg.items, after);
        assert_eq!(pg.next, Some(after[1] + 1));
        let pg = log.page(all.len() as u64 + 5, 10, 10, alice).unwrap();
        assert!(pg.items.is_empty() && pg.next.is_none());
        // Destroy the first 512 records' bytes: a page from 600 does not
        // read them.
        let bytes = std::fs::read(&p).unwrap();
        let (recs, _) = crate::verify::records(&bytes).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        use std::io::Write;
        f.write_all(&vec![0xee; recs[512].0 as usize]).unwrap();
        drop(f);
        let pg = log.page(600, 1000, 10_000, alice).unwrap();
        assert_eq!(
            pg.items.first(),
            want.iter().find(|&&s| s >= 600),
            "{:?}",
            &pg.items[..3]
        );
        assert!(pg.items.len() > 100);
        std::mem::forget(log); // its close would checkpoint onto a log we broke
    }
}
