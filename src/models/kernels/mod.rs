//! The CPU kernels the architectures are built from: quantized matrix products (`qmatmul`), the f32 GEMM
//! (`sgemm`), attention, rotary position embedding (`rope`), element-wise ops (`ops`, and glibc's `expf`
//! eight lanes at a time in `expf`), the compute team that runs them, and CPU feature dispatch (`cpu`). The architectures (`super::llama`,
//! `super::bert`, `super::bert_packed`) call these and nothing here knows an architecture; a GPU kernel
//! gets its home beside them.
pub(crate) mod attention;
pub mod cpu;
pub(crate) mod expf;
pub mod ops;
pub mod qmatmul;
pub(crate) mod rope;
pub mod sgemm;
pub mod team;
