//! Generates the gRPC code and the descriptor set for reflection with protox (pure Rust: no system protoc).
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    // omnibus's own API and the Open Inference Protocol (KServe v2), served side by side.
    let protos = ["proto/omnibus/v1/inference.proto", "proto/inference/grpc_service.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("omnibus_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Our codec: prost's, with malformed requests answered INVALID_ARGUMENT (see src/server/codec.rs).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::server::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
