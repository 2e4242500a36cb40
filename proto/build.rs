//! Generates the `bubble.v1` gRPC code with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/bubble/v1/broker.proto");
    tonic_prost_build::configure().compile_protos(&["proto/bubble/v1/broker.proto"], &["proto"])?;
    Ok(())
}
