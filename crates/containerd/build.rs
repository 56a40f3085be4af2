// Generates containerd's snapshots API (server, and the client tests use) from
// the hand-kept .proto files, and the client of a subset of the CRI (PullImage,
// and a pod of one container, for tests that drive containerd as the kubelet
// does); needs `protoc`
// (Debian: protobuf-compiler + libprotobuf-dev). The client side of
// containerd's own API comes from the containerd-client crate, which builds
// no servers; the CRI API is not in it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &["proto/containerd/services/snapshots/v1/snapshots.proto"],
        &["proto", "/usr/include"],
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/k8s.io/cri-api/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
