//! `health_probe_cost`: what the health probes of a full warm pool cost,
//! as a percentage of one core.
//!
//! The probes cannot be turned off, so this measures an upper bound: the
//! CPU time (user + system) of the whole idle system — this process (the
//! broker, its runtime, the probe loop; the bench's client is idle) and
//! every VMM process under it — over a window in which nothing but the
//! probes runs: a pool of `POOL` READY bubbles, no parent requests. The
//! probes done in the window are counted from the broker's metrics.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;

use super::helpers::{metric_value, wait_pool};
use super::Ctx;
use crate::stats::{round, Stat};

/// Pooled bubbles probed.
pub(crate) const POOL: usize = 100;
/// The measured window.
const WINDOW: Duration = Duration::from_secs(30);

/// utime + stime of a process, clock ticks (`/proc/PID/stat` fields 14, 15).
fn cpu_ticks(stat: &str) -> Option<(u32, u64)> {
    // The command is in parentheses and may hold spaces: parse after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields from 3 on: state(3) ppid(4) ... utime(14) stime(15).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ppid, ticks))
}

/// CPU ticks of this process and every process under it; how many.
fn tree_ticks() -> (u64, usize) {
    let me = std::process::id();
    let mut procs: HashMap<u32, (u32, u64)> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(t) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| cpu_ticks(&s))
            {
                procs.insert(pid, t);
            }
        }
    }
    let under_me = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match procs.get(&pid) {
                Some(&(ppid, _)) if ppid != 0 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    let mine: Vec<u64> = procs
        .iter()
        .filter(|(pid, _)| under_me(**pid))
        .map(|(_, (_, t))| *t)
        .collect();
    (mine.iter().sum(), mine.len())
}

pub(crate) async fn health_probe_cost(x: &mut Ctx) -> anyhow::Result<Stat> {
    // /proc reports in USER_HZ, 100 on x86-64.
    let hz = 100.0;
    let t0 = Instant::now();
    while {
        wait_pool(&x.broker, POOL).await;
        metric_value(&x.broker.scrape(), "bubbled_pool_depth{profile=\"warm\"}") < POOL as f64
    } {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "the pool did not reach {POOL} within 600 s"
        );
    }
    // Let the refiller and the spares settle, then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let probes = |m: &str| {
        metric_value(m, "bubbled_pool_probes_total{result=\"healthy\"}")
            + metric_value(m, "bubbled_pool_probes_total{result=\"unhealthy\"}")
    };
    let p0 = probes(&x.broker.scrape());
    let (c0, n) = tree_ticks();
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let (c1, _) = tree_ticks();
    let wall = start.elapsed().as_secs_f64();
    let p1 = probes(&x.broker.scrape());
    let cpu_s = c1.saturating_sub(c0) as f64 / hz;
    let pct = 100.0 * cpu_s / wall;
    let n_probes = p1 - p0;
    let mut extra = BTreeMap::new();
    extra.insert("pooled_bubbles".into(), json!(POOL));
    extra.insert("processes".into(), json!(n));
    extra.insert("window_s".into(), json!(round(wall)));
    extra.insert("probes".into(), json!(n_probes));
    extra.insert("idle_cpu_pct_of_core_upper_bound".into(), json!(pct));
    extra.insert(
        "cpu_us_per_probe_upper_bound".into(),
        json!(if n_probes > 0.0 {
            round(cpu_s * 1e6 / n_probes)
        } else {
            0.0
        }),
    );
    let per = if n_probes > 0.0 {
        Duration::from_secs_f64(cpu_s / n_probes)
    } else {
        Duration::ZERO
    };
    Ok(Stat {
        p50: per,
        p99: per,
        n: n_probes as usize,
        extra,
    })
}
