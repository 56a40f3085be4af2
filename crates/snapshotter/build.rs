// Generates containerd's snapshots API (server and client) from the hand-kept
// .proto files; needs `protoc` (Debian: protobuf-compiler + libprotobuf-dev).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &["proto/containerd/services/snapshots/v1/snapshots.proto"],
        &["proto", "/usr/include"],
    )?;
    Ok(())
}
