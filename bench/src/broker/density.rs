//! Density: 1,000 small bubbles at once, and what each costs in memory.

use std::time::Instant;

use bubble_proto::v1 as pb;
use serde_json::json;

use super::Ctx;
use crate::stats::{round, stat, Stat};

/// Creates 1,000 4 MiB bubbles, checks that every 50th answers, measures
/// the VMM processes' memory and deletes them.
pub(crate) async fn density_1000(x: &mut Ctx) -> anyhow::Result<Stat> {
    let n = 1000usize;
    let small = pb::CreateBubbleRequest {
        memory_mib: 4,
        ..x.create.clone()
    };
    let start = Instant::now();
    let mut ids = Vec::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let b = x.c.create_bubble(small.clone()).await?.into_inner();
        v.push(t.elapsed());
        anyhow::ensure!(
            b.state == pb::BubbleState::Ready as i32,
            "{}",
            b.failure_reason
        );
        ids.push((b.bubble_id, b.vmm_pid));
    }
    let created_s = start.elapsed().as_secs_f64();
    // Every bubble still answers.
    for (id, _) in ids.iter().step_by(50) {
        x.c.call(pb::CallRequest {
            bubble_id: id.clone(),
            op: "echo".into(),
            input: b"alive".to_vec(),
            ..Default::default()
        })
        .await?;
    }
    let (mut rss, mut guest, mut guest_pss, mut waiters) = (0u64, 0u64, 0u64, 0u64);
    for (_, pid) in &ids {
        let (r, g, gp) = rss_kib(*pid, 4 << 10);
        rss += r;
        guest += g;
        guest_pss += gp;
        waiters += waiter_pss_kib(*pid);
    }
    // A jailed VMM's waiter (the process the broker spawned, outside the
    // VMM's pid namespace) is part of what a bubble costs.
    rss += waiters;
    let mut s = stat(v);
    s.extra.insert("bubbles".into(), json!(n));
    s.extra
        .insert("create_all_s".into(), json!(round(created_s)));
    s.extra
        .insert("rss_per_bubble_kib".into(), json!(rss / n as u64));
    s.extra.insert(
        "rss_measure".into(),
        json!("PSS of each VMM process and of its waiter"),
    );
    s.extra.insert(
        "waiter_pss_per_bubble_kib".into(),
        json!(waiters / n as u64),
    );
    s.extra.insert(
        "guest_touched_per_bubble_kib".into(),
        json!(guest / n as u64),
    );
    s.extra.insert(
        "guest_pss_per_bubble_kib".into(),
        json!(guest_pss / n as u64),
    );
    // What a bubble costs beyond its guest pages: the process's PSS
    // minus the PSS of its guest memory (shared image pages count as
    // their share in both).
    s.extra.insert(
        "rss_beyond_guest_per_bubble_kib".into(),
        json!(rss.saturating_sub(guest_pss) / n as u64),
    );
    for (id, _) in ids {
        x.c.delete_bubble(pb::BubbleRef { bubble_id: id }).await?;
    }
    Ok(s)
}

/// PSS of the waiter of VMM `pid` (its parent, when that is a VMM
/// process too: the jail's waiter), KiB; 0 without one.
fn waiter_pss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let Some(ppid) = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return 0;
    };
    let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("__vmm") {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/{ppid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory of a VMM process, KiB: (PSS of the whole process, RSS of guest
/// memory, PSS of guest memory). PSS shares pages mapped by several
/// processes (binary, libraries, the shared shim image) among them. Guest
/// memory is `guest_kib` of contiguous address space: one anonymous
/// mapping, or an anonymous mapping split by the shared image mapped
/// copy-on-write inside it (`/memfd:bubble-image`).
fn rss_kib(pid: u32, guest_kib: u64) -> (u64, u64, u64) {
    struct Vma {
        start: u64,
        end: u64,
        name: String,
        rss: u64,
        pss: u64,
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut vmas: Vec<Vma> = Vec::new();
    for l in smaps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(first) = f.first() else { continue };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                vmas.push(Vma {
                    start,
                    end,
                    name: f.get(5..).map(|n| n.join(" ")).unwrap_or_default(),
                    rss: 0,
                    pss: 0,
                });
                continue;
            }
        }
        let val = || f.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if let Some(v) = vmas.last_mut() {
            match *first {
                "Rss:" => v.rss = val(),
                "Pss:" => v.pss = val(),
                _ => {}
            }
        }
    }
    let pss_total: u64 = vmas.iter().map(|v| v.pss).sum();
    let size = guest_kib * 1024;
    // Guest memory: a run of adjacent mappings spanning exactly its size,
    // either one anonymous mapping or anonymous + image + anonymous.
    for (i, v) in vmas.iter().enumerate() {
        let mut end = v.end;
        let mut k = i;
        while end - v.start < size && k + 1 < vmas.len() && vmas[k + 1].start == end {
            k += 1;
            end = vmas[k].end;
        }
        let run = &vmas[i..=k];
        let anon = |m: &Vma| m.name.is_empty() || m.name.contains("memfd:bubble-image");
        if end - v.start == size
            && run.iter().all(anon)
            && (run.len() == 1 || run.iter().any(|m| !m.name.is_empty()))
        {
            let rss = run.iter().map(|m| m.rss).sum();
            let pss = run.iter().map(|m| m.pss).sum();
            return (pss_total, rss, pss);
        }
    }
    (pss_total, 0, 0)
}
