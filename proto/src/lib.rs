//! gRPC API of `bubbled`: the `bubble.v1.Broker` service and its messages.
//!
//! The schema lives in `proto/bubble/v1/broker.proto`; this crate only
//! compiles it (with a vendored `protoc`, so nothing needs installing).

#![forbid(unsafe_code)]
#![allow(clippy::large_enum_variant)]

pub mod codec;

/// Package `bubble.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("bubble.v1");
}

pub use v1::*;

/// gRPC metadata key set on a FAILED_PRECONDITION when the bubble does not
/// hold a call's sealed session (never opened, evicted, or its id used
/// before): the client opens a new session.
pub const SESSION_REFUSED_KEY: &str = "bubble-session";
/// The value of [`SESSION_REFUSED_KEY`].
pub const SESSION_REFUSED_VALUE: &str = "refused";
