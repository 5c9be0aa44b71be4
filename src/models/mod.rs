//! Model architectures as plain structs with a constructor from weights and a `forward`, like candle's.
//! Weights are immutable; anything per request is an argument.
mod attention;
pub mod bert;
pub mod bert_packed;
pub mod cpu;
pub mod llama;
pub mod ops;
pub mod qmatmul;
pub mod sgemm;
pub mod team;
