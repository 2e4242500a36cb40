//! How `bubblectl` prints bubbles, and reads and writes bytes as text.

use anyhow::Context;
use bubble_proto::v1 as pb;
use serde_json::json;

/// Name of a proto state for people.
pub fn state_label(state: i32) -> &'static str {
    match pb::BubbleState::try_from(state) {
        Ok(pb::BubbleState::Booting) => "BOOTING",
        Ok(pb::BubbleState::Ready) => "READY",
        Ok(pb::BubbleState::Busy) => "BUSY",
        Ok(pb::BubbleState::Suspended) => "SUSPENDED",
        Ok(pb::BubbleState::Failed) => "FAILED",
        Ok(pb::BubbleState::Deleted) => "DELETED",
        _ => "UNKNOWN",
    }
}

pub(super) fn bubble_json(b: &pb::Bubble) -> serde_json::Value {
    json!({
        "bubble_id": b.bubble_id, "owner": b.owner, "state": state_label(b.state),
        "failure_reason": b.failure_reason, "memory_mib": b.memory_mib, "vcpus": b.vcpus,
        "image": b.image, "client_request_id": b.client_request_id,
        "created_at_ms": b.created_at_ms, "boot_us": b.boot_us, "vmm_pid": b.vmm_pid,
        "calls": b.calls, "generation": b.generation, "jail_warning": b.jail_warning,
    })
}

pub(super) fn print_table(bubbles: &[pb::Bubble]) {
    println!(
        "{:<34}  {:<9}  {:>7}  {:>9}  {:>7}  {:>7}  REASON",
        "BUBBLE", "STATE", "MEM_MIB", "BOOT_MS", "CALLS", "PID"
    );
    for b in bubbles {
        println!(
            "{:<34}  {:<9}  {:>7}  {:>9.2}  {:>7}  {:>7}  {}",
            b.bubble_id,
            state_label(b.state),
            b.memory_mib,
            b.boot_us as f64 / 1000.0,
            b.calls,
            b.vmm_pid,
            b.failure_reason
        );
    }
}

/// Bubbles of every parent (the operator's view): the owner first,
/// `(pool)` for a warm-pool bubble nobody owns yet.
pub(super) fn print_owned_table(bubbles: &[pb::Bubble]) {
    println!(
        "{:<24}  {:<34}  {:<9}  {:>7}  {:>7}",
        "OWNER", "BUBBLE", "STATE", "MEM_MIB", "PID"
    );
    for b in bubbles {
        let owner = if b.owner.is_empty() {
            "(pool)"
        } else {
            b.owner.as_str()
        };
        println!(
            "{:<24}  {:<34}  {:<9}  {:>7}  {:>7}",
            owner,
            b.bubble_id,
            state_label(b.state),
            b.memory_mib,
            b.vmm_pid
        );
    }
}

/// A list of bubbles: a JSON array, or a table.
pub(super) fn print_bubbles(bubbles: &[pb::Bubble], json_out: bool) {
    if json_out {
        let v: Vec<_> = bubbles.iter().map(bubble_json).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        print_table(bubbles);
    }
}

/// One bubble: a JSON object, or a one-row table.
pub(super) fn print_bubble(b: &pb::Bubble, json_out: bool) {
    if json_out {
        println!("{}", bubble_json(b));
    } else {
        print_table(std::slice::from_ref(b));
        if !b.jail_warning.is_empty() {
            println!("WARNING: jail incomplete: {}", b.jail_warning);
        }
    }
}

/// Prints the bubble an RPC answered with (or fails with its status).
pub(super) fn print_reply(
    reply: Result<tonic::Response<pb::Bubble>, tonic::Status>,
    json_out: bool,
) -> anyhow::Result<pb::Bubble> {
    let b = reply.map_err(status_err)?.into_inner();
    print_bubble(&b, json_out);
    Ok(b)
}

/// A broker's refusal, typed (its code decides the exit code).
pub(super) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(super::errors::BrokerStatus::from(s))
}

/// How `call` prints its output; the format never depends on the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum OutputFormat {
    /// UTF-8 text; control characters (but newline and tab) and bytes that
    /// are not UTF-8 are escaped as \xNN, so a terminal is never driven.
    Text,
    /// Lowercase hex.
    Hex,
    /// The bytes unchanged.
    Raw,
}

/// Prints `b` on standard output in `format` (text and hex end with a
/// newline, raw does not).
pub(super) fn write_output(b: &[u8], format: OutputFormat) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Text => writeln!(out, "{}", escaped_text(b))?,
        OutputFormat::Hex => writeln!(out, "{}", hex(b))?,
        OutputFormat::Raw => out.write_all(b)?,
    }
    out.flush()?;
    Ok(())
}

/// `b` as text: valid UTF-8 stays, anything else and control characters
/// (but newline and tab) become \xNN.
pub(super) fn escaped_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() && c != '\n' && c != '\t' {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    s.push_str(&format!("\\x{byte:02x}"));
                }
            } else {
                s.push(c);
            }
        }
        for byte in chunk.invalid() {
            s.push_str(&format!("\\x{byte:02x}"));
        }
    }
    s
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes given as hex on the command line (none: empty).
pub(super) fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s = s.trim();
    anyhow::ensure!(
        s.len().is_multiple_of(2),
        "hex input has an odd number of digits"
    );
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .context("hex input has a non-hex digit")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(unhex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(unhex("0").is_err());
        assert!(unhex("zz").is_err());
        assert_eq!(hex(&[1, 0xab]), "01ab");
    }

    #[test]
    fn text_output_escapes_control_bytes_and_non_utf8() {
        assert_eq!(escaped_text(b"hi\tthere\n"), "hi\tthere\n");
        assert_eq!(escaped_text(b"\x1b[2J"), "\\x1b[2J");
        assert_eq!(escaped_text(&[b'a', 0xff, 0xfe]), "a\\xff\\xfe");
    }

    #[test]
    fn state_labels() {
        assert_eq!(state_label(pb::BubbleState::Ready as i32), "READY");
        assert_eq!(state_label(pb::BubbleState::Suspended as i32), "SUSPENDED");
        assert_eq!(state_label(-1), "UNKNOWN");
    }
}
