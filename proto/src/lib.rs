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
