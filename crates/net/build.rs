//! Compiles `proto/fedra/v1/federation.proto` with protox (a protobuf compiler in Rust), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/fedra/v1/federation.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".fedra.v1.TensorChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
