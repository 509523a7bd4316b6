//! Compiles `proto/` (the repository's `proto/` links here, so the published crate carries
//! it) with a pure-Rust protobuf compiler, so no system protoc is needed.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let file = root.join("mqtt_im/v1/im.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
