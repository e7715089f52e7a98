//! Compiles the .proto files with a vendored protoc, so a machine with only the
//! Rust toolchain builds Weft.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let files = [
        "weft/v1/common.proto",
        "weft/v1/container_manager.proto",
        "weft/v1/resource_tracker.proto",
        "weft/v1/application_master.proto",
        "weft/v1/client.proto",
        "weft/v1/raft_transport.proto",
        "weft/v1/token.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &["."])?;
    Ok(())
}
