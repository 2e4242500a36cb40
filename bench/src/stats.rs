//! One metric's samples summarized, and the results table.

use std::collections::BTreeMap;
use std::time::Duration;

use bubbled::demo::percentile;
use serde_json::Value;

/// One metric's samples summarized.
pub(crate) struct Stat {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) n: usize,
    pub(crate) extra: BTreeMap<String, Value>,
}

pub(crate) fn stat(mut v: Vec<Duration>) -> Stat {
    v.sort();
    Stat {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        n: v.len(),
        extra: BTreeMap::new(),
    }
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Rounds to one decimal.
pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Prints every metric with its ratio to the floors or its target.
pub(crate) fn print_results(results: &BTreeMap<&str, Stat>) {
    println!(
        "{:<18} {:>7} {:>11} {:>11}  ratio",
        "metric", "n", "p50 (µs)", "p99 (µs)"
    );
    let floor = results.get("raw_kvm_floor").map(|s| s.p50);
    let rtt = results.get("raw_exit_rtt").map(|s| s.p50);
    let extra = |s: &Stat, k: &str| s.extra.get(k).map(|v| v.to_string()).unwrap_or_default();
    for (k, s) in results {
        let ratio = match (*k, floor, rtt) {
            ("create_to_ready", Some(f), _) => {
                let mut t = format!(
                    "{:.2} × raw_kvm_floor (target ≤ 3)",
                    s.p50.as_secs_f64() / f.as_secs_f64()
                );
                if let Some(p) = results
                    .get("raw_kvm_floor")
                    .and_then(|f| f.extra.get("prepared_p50_us"))
                    .and_then(Value::as_f64)
                {
                    t += &format!("; {:.2} × the prepared floor", us(s.p50) / p);
                }
                t + &format!("; VMM steps p50 µs: {}", extra(s, "vmm_steps_p50_us"))
            }
            ("create_then_attest", Some(f), _) => format!(
                "{:.2} × raw_kvm_floor; of which the first attestation p50 {} µs",
                s.p50.as_secs_f64() / f.as_secs_f64(),
                extra(s, "first_attestation_p50_us")
            ),
            ("call_echo_64b", _, Some(r)) => format!(
                "raw_exit_rtt + {:.1} µs (target ≤ +150); answer polling off: p50 {} µs",
                us(s.p50) - us(r),
                extra(s, "answer_poll_off_p50_us")
            ),
            ("call_tokenize", _, Some(r)) => {
                format!("raw_exit_rtt + {:.1} µs (target ≤ +300)", us(s.p50) - us(r))
            }
            ("call_tokenize_sealed", _, _) => results
                .get("call_tokenize")
                .map(|t| {
                    format!(
                        "call_tokenize + {:.1} µs (target ≤ +30; of which client sealing {} µs)",
                        us(s.p50) - us(t.p50),
                        extra(s, "seal_p50_us")
                    )
                })
                .unwrap_or_default(),
            ("attach_warm" | "attach_warm_policy", _, _) => "target p50 ≤ 300 µs".to_string(),
            ("attach_warm_policy_cold", _, _) => {
                "the policy installed at attach (pool without one)".to_string()
            }
            ("suspend_64m" | "restore_64m" | "suspend_512m" | "restore_512m", _, _) => format!(
                "{} MB frozen, {} MB/s{}",
                extra(s, "frozen_mb"),
                extra(s, "mb_per_s"),
                if *k == "restore_64m" {
                    if s.extra.get("over_socket") == Some(&Value::Bool(true)) {
                        " (over the socket; target p50 ≤ 10 ms)"
                    } else {
                        " (target p50 ≤ 10 ms)"
                    }
                } else {
                    ""
                }
            ),
            ("restore_refusal", _, _) => format!(
                "p50/p99 µs: unknown {}/{}, foreign key {}/{}, damaged {}/{}",
                extra(s, "unknown_p50_us"),
                extra(s, "unknown_p99_us"),
                extra(s, "foreign_key_p50_us"),
                extra(s, "foreign_key_p99_us"),
                extra(s, "damaged_p50_us"),
                extra(s, "damaged_p99_us")
            ),
            ("set_policy_guest", _, _) => format!(
                "in process, fresh bubble; echo {} µs; runtime creation {} µs; set_policy after it {} µs",
                extra(s, "echo_p50_us"),
                extra(s, "runtime_creation_p50_us"),
                extra(s, "set_policy_prewarmed_p50_us")
            ),
            ("security_accounting", _, _) => format!(
                "per call, in process (target ≤ 10 µs); mean {} µs; hmac p50 {} µs, p99 {} µs",
                extra(s, "mean_us"),
                extra(s, "hmac_p50_us"),
                extra(s, "hmac_p99_us")
            ),
            ("tokenize_4_parents", _, _) => format!("{} calls/s", extra(s, "per_sec")),
            ("event_to_result", _, r) => format!(
                "direct signed call p50 {} µs, event path adds {} µs{}",
                extra(s, "call_p50_us"),
                extra(s, "dispatch_p50_us"),
                r.map(|r| format!("; raw_exit_rtt + {:.1} µs", us(s.p50) - us(r)))
                    .unwrap_or_default()
            ),
            ("event_to_start" | "event_to_start_nats", f, r) => format!(
                "{}{}{}: sent → CALL to the VMM; PublishEvent p50/p99 {}/{} µs; result p50/p99 {}/{} µs",
                extra(s, "source"),
                r.map(|r| format!(", {:.1} × raw_exit_rtt", us(s.p50) / us(r)))
                    .unwrap_or_default(),
                f.map(|f| format!(", {:.2} × raw_kvm_floor", us(s.p50) / us(f)))
                    .unwrap_or_default(),
                extra(s, "publish_p50_us"),
                extra(s, "publish_p99_us"),
                extra(s, "result_p50_us"),
                extra(s, "result_p99_us")
            ),
            ("events_per_sec" | "events_per_sec_nats", _, _) => format!(
                "{} events/s with {} bubbles (stat: PublishEvent round trip)",
                extra(s, "per_sec"),
                extra(s, "bubbles")
            ),
            ("density_1000", _, _) => format!(
                "PSS/bubble {} KiB, beyond guest pages {} KiB (target ≤ 1024)",
                extra(s, "rss_per_bubble_kib"),
                extra(s, "rss_beyond_guest_per_bubble_kib")
            ),
            _ => String::new(),
        };
        println!(
            "{:<18} {:>7} {:>11.1} {:>11.1}  {}",
            k,
            s.n,
            us(s.p50),
            us(s.p99),
            ratio
        );
    }
}
