//! How `bubblectl` fails: one line on stderr (or `{"error":{...}}` on
//! stdout under `--json`) and an exit code by class.
//!
//! Exit codes:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | local error (a file, an argument's value, the output) |
//! | 2 | usage error (unknown flag, missing argument) |
//! | 4 | verification failed (attestation refused, a result's signature) |
//! | 10 + N | the broker answered gRPC status N (see [`EXIT_TABLE`]) |
//!
//! A broker that cannot be reached is UNAVAILABLE (exit 24).
//! `attest verify` keeps its own codes (2 signature or chain, 3 policy).

use std::process::ExitCode;

use bubble_client::{ClientError, ConnectError};
use serde_json::json;
use tonic::Code;

/// The exit-code table, as `bubblectl --help` prints it.
pub const EXIT_TABLE: &str = "\
Exit codes: 0 ok; 1 local error (file, value); 2 usage; 4 verification \
failed (attestation, signature); 10+N the broker's gRPC status N: \
11 CANCELLED, 12 UNKNOWN, 13 INVALID_ARGUMENT, 14 DEADLINE_EXCEEDED, \
15 NOT_FOUND, 16 ALREADY_EXISTS, 17 PERMISSION_DENIED, 18 RESOURCE_EXHAUSTED, \
19 FAILED_PRECONDITION, 20 ABORTED, 21 OUT_OF_RANGE, 22 UNIMPLEMENTED, \
23 INTERNAL, 24 UNAVAILABLE (also: broker not reachable), 25 DATA_LOSS, \
26 UNAUTHENTICATED. Under --json an error is {\"error\":{\"code\",\"message\"}} \
on stdout.";

/// Exit code of a local error.
const EXIT_LOCAL: u8 = 1;
/// Exit code of a refused verification.
const EXIT_VERIFY: u8 = 4;
/// Exit codes of broker statuses start here.
const EXIT_STATUS_BASE: u8 = 10;

/// The broker refused a request with this status.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct BrokerStatus {
    /// gRPC code.
    pub code: Code,
    /// The broker's message.
    pub message: String,
}

impl From<tonic::Status> for BrokerStatus {
    fn from(s: tonic::Status) -> Self {
        // A request the transport lost (the broker closed the connection:
        // past the per-uid cap, or it went away) comes back UNKNOWN from
        // tonic; it says nothing about the request: the broker was not
        // reachable.
        let lost = match s.code() {
            Code::Unknown => transport_lost(&s),
            // bubblectl never cancels a request: a CANCELLED with a local
            // cause is the connection closed under it (hyper's "operation
            // was canceled"), as likely as the UNKNOWN above when the
            // broker closes a connection past the cap. A CANCELLED the
            // broker sent has no cause.
            Code::Cancelled => std::error::Error::source(&s).is_some(),
            _ => false,
        };
        let code = if lost { Code::Unavailable } else { s.code() };
        Self {
            code,
            message: s.message().to_string(),
        }
    }
}

/// Whether a status carries a transport or I/O failure as its cause.
fn transport_lost(s: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.is::<tonic::transport::Error>() || c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// What the hint about a missing broker says.
const CONNECT_HINT: &str = "is bubbled running? Give its socket with --socket PATH or \
BUBBLED_SOCKET (or --endpoint URL for mutual TLS)";

/// The name gRPC gives a code (`INVALID_ARGUMENT`).
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A failure's class: its code name, exit code and whether to add the
/// connect hint.
struct Class {
    code: &'static str,
    exit: u8,
    hint: bool,
}

fn status_class(code: Code) -> Class {
    Class {
        code: code_name(code),
        exit: EXIT_STATUS_BASE + code as u8,
        hint: false,
    }
}

fn unreachable_class() -> Class {
    Class {
        hint: true,
        ..status_class(Code::Unavailable)
    }
}

/// Classifies an error by the first typed cause in its chain.
fn classify(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<BrokerStatus>() {
            return status_class(s.code);
        }
        if cause.downcast_ref::<ConnectError>().is_some() {
            return unreachable_class();
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Status { code, .. } => status_class(*code),
                // The bubble refused the sealed session twice (the library
                // reopens once): its gRPC code.
                ClientError::SessionRefused(_) => status_class(tonic::Code::FailedPrecondition),
                ClientError::Connect(_) => unreachable_class(),
                ClientError::NotAttested
                | ClientError::BadResult(_)
                | ClientError::Attestation(_) => Class {
                    code: "VERIFICATION_FAILED",
                    exit: EXIT_VERIFY,
                    hint: false,
                },
                _ => break,
            };
        }
    }
    Class {
        code: "LOCAL",
        exit: EXIT_LOCAL,
        hint: false,
    }
}

/// One line: the error and each cause whose text it does not already hold
/// (error types that print their source too would otherwise say it twice).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Reports a failure (stderr, or JSON on stdout) and gives its exit code.
pub fn report(e: &anyhow::Error, json_out: bool) -> ExitCode {
    let class = classify(e);
    let mut message = one_line(e);
    if class.hint {
        message = format!("{message} ({CONNECT_HINT})");
    }
    if json_out {
        println!(
            "{}",
            json!({"error": {"code": class.code, "message": message, "exit_code": class.exit}})
        );
    } else {
        eprintln!("bubblectl: {message}");
    }
    ExitCode::from(class.exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_cancelled_under_it_is_the_broker_unreachable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "closed");
        let mut lost = tonic::Status::cancelled("operation was canceled");
        lost.set_source(std::sync::Arc::new(io));
        assert_eq!(BrokerStatus::from(lost).code, Code::Unavailable);
        // One the broker sent (no local cause) stays what it is.
        let sent = tonic::Status::cancelled("stopped");
        assert_eq!(BrokerStatus::from(sent).code, Code::Cancelled);
    }

    #[test]
    fn a_request_the_transport_lost_is_the_broker_unreachable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let lost = tonic::Status::from_error(Box::new(io));
        assert_eq!(lost.code(), Code::Unknown);
        assert_eq!(BrokerStatus::from(lost).code, Code::Unavailable);
        // An UNKNOWN the broker itself sent stays UNKNOWN.
        let s = BrokerStatus::from(tonic::Status::unknown("broker said so"));
        assert_eq!(s.code, Code::Unknown);
    }

    #[test]
    fn broker_codes_map_to_distinct_exit_codes() {
        let e = anyhow::Error::new(BrokerStatus {
            code: Code::InvalidArgument,
            message: "memory_mib: too small".into(),
        })
        .context("creating");
        let c = classify(&e);
        assert_eq!((c.code, c.exit), ("INVALID_ARGUMENT", 13));
        assert_eq!(
            one_line(&e),
            "creating: INVALID_ARGUMENT: memory_mib: too small"
        );
        let e = anyhow::Error::new(ConnectError::Connect {
            target: "/x.sock".into(),
            detail: "No such file or directory (os error 2)".into(),
        });
        let c = classify(&e);
        assert_eq!((c.code, c.exit, c.hint), ("UNAVAILABLE", 24, true));
        assert_eq!(classify(&anyhow::anyhow!("bad hex")).exit, 1);
    }

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address in use");
        let e = anyhow::Error::new(io).context("cannot listen on x: Address in use");
        assert_eq!(one_line(&e), "cannot listen on x: Address in use");
    }
}
