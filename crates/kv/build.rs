//! Generates the etcd v3 API subset (server and client) from `proto/`.
//! The .proto files are parsed by `protox` (pure Rust), so the build needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(
        [
            "proto/rpc.proto",
            "proto/kv.proto",
            "proto/auth.proto",
            "proto/v3lock.proto",
            "proto/v3election.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(files)?;
    Ok(())
}
