//! `docs/guest-abi.md` is checked against this crate: its tables of message
//! types, error codes, call flags and limits are generated here from the
//! constants, and the document must contain each of them verbatim. When a
//! test fails it prints the table to paste into the document.

use std::format;
use std::string::String;

use crate::*;

const DOC: &str = include_str!("../../docs/guest-abi.md");

fn payload(t: MsgType) -> &'static str {
    match t {
        MsgType::Ready => "greeting text",
        MsgType::Reply => "output bytes (a signed result for a SIGN call)",
        MsgType::ErrorReply => "`[code u16][text ≤ MAX_TEXT_LEN]`",
        MsgType::Log => "text ≤ MAX_TEXT_LEN; the guest continues at once",
        MsgType::Panic => "text; the bubble fails",
        MsgType::Awaiting => {
            "`[timeout_ms u32][key_len u8][key ≤ MAX_AWAIT_KEY_LEN]`; the CALL stays pending"
        }
        MsgType::ReadyEarly => {
            "greeting text; resume once with no request, then READY follows"
        }
        MsgType::Resume => "`[status u8: 1 event, 2 timeout][event payload]`; continues the pending CALL",
        MsgType::Call => {
            "`[flags u8][op_len u8][op]` + SIGN: `[id_len u8][bubble id]` + SEAL: `[seal_to 32]` + `[input]`"
        }
    }
}

/// The message-type table.
pub(crate) fn msg_types() -> String {
    let mut s = String::from("| type | value | direction | payload |\n|---|---|---|---|\n");
    for t in MsgType::ALL {
        let dir = if t.from_guest() {
            "guest → host"
        } else {
            "host → guest"
        };
        s += &format!(
            "| {} | {:#04x} | {} | {} |\n",
            t.name(),
            t as u16,
            dir,
            payload(t)
        );
    }
    s
}

/// The error-code table.
pub(crate) fn error_codes() -> String {
    let mut s = String::from("| code | name | meaning |\n|---|---|---|\n");
    for c in ErrorCode::ALL {
        s += &format!("| {} | {} | {} |\n", c as u16, c.name(), c.meaning());
    }
    s
}

fn flag_meaning(name: &str) -> &'static str {
    match name {
        "SIGN" => "sign the result; the bubble id follows the op; the answer is a signed result",
        "SEAL" => "seal the output to `seal_to` (only with SIGN); the key follows the bubble id",
        _ => "undocumented",
    }
}

/// The call-flags table.
pub(crate) fn call_flags() -> String {
    let mut s = String::from("| bit | flag | meaning |\n|---|---|---|\n");
    for (f, name) in CallFlags::ALL {
        s += &format!(
            "| {:#04x} | {} | {} |\n",
            f.bits(),
            name,
            flag_meaning(name)
        );
    }
    s
}

/// The limits table.
pub(crate) fn limits() -> String {
    let rows: [(&str, u64); 17] = [
        ("ABI_VERSION", u64::from(ABI_VERSION)),
        ("HEADER_LEN", HEADER_LEN as u64),
        ("MAX_OP_LEN", MAX_OP_LEN as u64),
        ("MAX_NAME_LEN", MAX_NAME_LEN as u64),
        ("MAX_BUBBLE_ID_LEN", MAX_BUBBLE_ID_LEN as u64),
        ("MAX_TEXT_LEN", MAX_TEXT_LEN as u64),
        ("MIN_NONCE_LEN", MIN_NONCE_LEN as u64),
        ("MAX_NONCE_LEN", MAX_NONCE_LEN as u64),
        (
            "MAX_PORTION_FRAME_OVERHEAD",
            MAX_PORTION_FRAME_OVERHEAD as u64,
        ),
        ("MAX_CALL_OVERHEAD", MAX_CALL_OVERHEAD as u64),
        ("BOOT_INFO_GPA", BOOT_INFO_GPA),
        ("BOOT_INFO_LEN", BOOT_INFO_LEN as u64),
        ("ATTEST_BINDING_LEN", ops::AttestBinding::LEN as u64),
        (
            "SIGNED_RESULT_PREFIX_LEN",
            ops::SignedResult::PREFIX_LEN as u64,
        ),
        ("REPLAY_WINDOW", REPLAY_WINDOW as u64),
        ("MAX_AWAIT_KEY_LEN", MAX_AWAIT_KEY_LEN as u64),
        ("MAX_AWAIT_TIMEOUT_MS", u64::from(MAX_AWAIT_TIMEOUT_MS)),
    ];
    let mut s = String::from("| limit | value |\n|---|---|\n");
    for (name, v) in rows {
        if name == "BOOT_INFO_GPA" {
            s += &format!("| {name} | {v:#x} |\n");
        } else {
            s += &format!("| {name} | {v} |\n");
        }
    }
    s
}

fn check(what: &str, table: String) {
    assert!(
        DOC.contains(&table),
        "docs/guest-abi.md does not contain the {what} table of bubble-abi; it should read:\n\n{table}"
    );
}

#[test]
fn doc_lists_the_message_types() {
    check("message-type", msg_types());
}

#[test]
fn doc_lists_the_error_codes() {
    check("error-code", error_codes());
}

#[test]
fn doc_lists_the_call_flags() {
    check("call-flags", call_flags());
}

#[test]
fn doc_lists_the_limits() {
    check("limits", limits());
}

#[test]
fn doc_header_table_names_the_version() {
    let row = format!("| 4 | 2 | ABI version ({ABI_VERSION}) |");
    assert!(DOC.contains(&row), "header table should contain {row}");
    let title = format!("# Guest ABI v{ABI_VERSION}");
    assert!(DOC.starts_with(&title), "the doc should start with {title}");
}

/// `cargo test -p bubble-abi -- --ignored --nocapture print_tables` prints
/// the generated tables, to paste into the document.
#[test]
#[ignore]
fn print_tables() {
    std::println!(
        "{}\n{}\n{}\n{}",
        msg_types(),
        error_codes(),
        call_flags(),
        limits()
    );
}
