//! The snapshot stream decoders: a snapshot checked piece by piece as it
//! streams from a VMM (`snapshot::Scanner`), and a snapshot read back
//! from `RESTORE_DATA` frames (`control::PieceReader`). The first byte
//! picks where the rest is cut: the scanner's verdict must not depend on
//! the cuts, framed pieces must read back byte for byte, and raw bytes
//! read as frames must never panic.
#![no_main]

use std::io::Read;

use bubble_vmm::control::{Kind, PieceReader, Request, SNAPSHOT_PIECE};
use bubble_vmm::snapshot::Scanner;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = (usize::from(cut) * 97).clamp(1, SNAPSHOT_PIECE);
    let mut whole = Scanner::new();
    let one = whole.feed(body).ok().and_then(|()| whole.finish().ok());
    let mut s = Scanner::new();
    let fed = body.chunks(cut).all(|p| s.feed(p).is_ok());
    let pieces = if fed { s.finish().ok() } else { None };
    assert_eq!(one, pieces);

    let mut wire = Vec::new();
    for p in body.chunks(cut) {
        wire.extend(Request::RestoreData { bytes: p }.frame(7).unwrap());
    }
    let mut r = &wire[..];
    let mut got = Vec::new();
    PieceReader::new(&mut r, Kind::RestoreData, 7, body.len() as u64)
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, body);

    let mut r = body;
    let mut sink = Vec::new();
    let _ = PieceReader::new(&mut r, Kind::RestoreData, 7, u64::MAX).read_to_end(&mut sink);
});
