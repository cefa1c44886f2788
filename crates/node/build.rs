//! Generates the etcd v3 API subset (server and client) from `proto/`.
//! Needs `protoc` (Debian: protobuf-compiler); PROTOC may point at it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/rpc.proto", "proto/kv.proto"], &["proto"])?;
    Ok(())
}
