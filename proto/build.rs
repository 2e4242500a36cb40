//! Generates the `bubble.v1` gRPC code with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/bubble/v1/broker.proto");
    // Malformed requests are INVALID_ARGUMENT, not prost's INTERNAL.
    tonic_prost_build::configure()
        .codec_path("crate::codec::ApiCodec")
        .compile_protos(&["proto/bubble/v1/broker.proto"], &["proto"])?;
    Ok(())
}
