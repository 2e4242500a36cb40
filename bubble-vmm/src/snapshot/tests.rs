//! Snapshot state encoding and the streaming scanner.

use super::*;

fn snap(version: u32, launch_digest: Option<[u8; 48]>) -> VmSnapshot {
    let l = Layout::new(16 << 20, crate::layout::IMAGE_BASE + PAGE, 1 << 20).unwrap();
    VmSnapshot {
        version,
        mem_size: l.mem_size,
        mailbox_gpa: l.mailbox_gpa,
        mailbox_size: l.mailbox_size,
        heap_start: l.heap_start,
        heap_end: l.heap_end,
        vcpu: VcpuSnapshot {
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
        },
        launch_digest,
    }
}

#[test]
fn the_launch_digest_travels_and_old_states_still_decode() {
    for d in [Some([7u8; 48]), None] {
        let b = snap(SNAPSHOT_VERSION, d).encode();
        assert_eq!(VmSnapshot::decode(&b).unwrap().launch_digest, d);
    }
    // Version 1 (no digest) still decodes, without a digest.
    let v1 = snap(1, Some([7u8; 48])).encode();
    assert_eq!(VmSnapshot::decode(&v1).unwrap().launch_digest, None);
    // A flag other than 0/1, or "unknown" with a non-zero digest: refused.
    let mut b = snap(SNAPSHOT_VERSION, Some([7u8; 48])).encode();
    b[48] = 2;
    assert!(VmSnapshot::decode(&b).is_none());
    b[48] = 0;
    assert!(VmSnapshot::decode(&b).is_none());
    let good = snap(SNAPSHOT_VERSION, Some([7u8; 48])).encode();
    for n in 0..good.len() {
        assert!(VmSnapshot::decode(&good[..n]).is_none());
    }
}

/// A snapshot body with pages at these guest addresses.
fn body(gpas: &[u64]) -> Vec<u8> {
    let state = snap(SNAPSHOT_VERSION, None).encode();
    let mut b = (state.len() as u32).to_le_bytes().to_vec();
    b.extend(&state);
    b.extend((gpas.len() as u32).to_le_bytes());
    for g in gpas {
        b.extend(g.to_le_bytes());
        b.extend([(*g >> 12) as u8 | 1; PAGE as usize]);
    }
    b
}

#[test]
fn the_scanner_checks_a_snapshot_cut_anywhere() {
    let good = body(&[0x1000, 0x2000, 0x3000, 0x9000]);
    for cut in [1, 3, 7, 4096, 4104, 5000, good.len()] {
        let mut s = Scanner::new();
        for piece in good.chunks(cut) {
            s.feed(piece).unwrap();
        }
        let got = s.finish().unwrap();
        assert_eq!(got.runs, vec![(0x1000, 3), (0x9000, 1)], "cut {cut}");
        assert_eq!(got.len, good.len() as u64);
        assert_eq!(got.mem_size, 16 << 20);
    }
    assert_eq!(page_runs(&good), Some(vec![(0x1000, 3), (0x9000, 1)]));
    // The bubble's own memory size passes; a VMM naming a larger (or
    // smaller) memory than its bubble's is refused at the state.
    let mut s = Scanner::expecting(16 << 20);
    s.feed(&good).unwrap();
    assert!(s.finish().is_ok());
    let mut s = Scanner::expecting(8 << 20);
    assert!(s.feed(&good).is_err());
    // Short, long, out of order, outside memory, unaligned: refused.
    let mut s = Scanner::new();
    s.feed(&good[..good.len() - 1]).unwrap();
    assert!(s.finish().is_err());
    let mut s = Scanner::new();
    assert!(s.feed(&[&good[..], &[0]].concat()).is_err());
    for gpas in [&[0x2000, 0x1000][..], &[16 << 20], &[0x1001]] {
        let mut s = Scanner::new();
        assert!(s.feed(&body(gpas)).is_err(), "{gpas:?}");
    }
    // A zero or huge state length, or more pages than memory.
    for n in [0u32, (MAX_STATE_LEN + 1) as u32] {
        assert!(Scanner::new().feed(&n.to_le_bytes()).is_err());
    }
    let mut b = body(&[]);
    let at = b.len() - 4;
    b[at..].copy_from_slice(&(((16 << 20) / PAGE) as u32 + 1).to_le_bytes());
    assert!(Scanner::new().feed(&b).is_err());
}
