// Generates containerd's snapshots API (server and client) and the client side
// of its content, images and leases APIs from the hand-kept .proto files, and
// the client of the CRI ImageService (PullImage only, for tests that pull as
// the kubelet does); needs `protoc` (Debian: protobuf-compiler + libprotobuf-dev).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/containerd/services/snapshots/v1/snapshots.proto",
            "proto/containerd/services/content/v1/content.proto",
            "proto/containerd/services/images/v1/images.proto",
            "proto/containerd/services/leases/v1/leases.proto",
        ],
        &["proto", "/usr/include"],
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/k8s.io/cri-api/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
