//! The generated gRPC code and the descriptor set reflection serves: `omnibus.v1` here, the KServe v2
//! Open Inference Protocol (`inference`) in [`oip`]. It depends on nothing else of the server (only the
//! codec the build names), so clients can use it alone.
tonic::include_proto!("omnibus.v1");

pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/omnibus_descriptor.bin"));

/// The Open Inference Protocol's messages and services.
pub mod oip {
    tonic::include_proto!("inference");
}
