//! omnibus: a model-serving server. gRPC `Predict` (sentence embeddings) and streaming `Generate` (LLM
//! tokens), with a batching scheduler in front of each model.
//!
//! # Layout
//! Layers call only downward:
//! - [`config`]: `omnibus serve`'s flags and their cross-field check, turned into one typed config per
//!   layer (the binary's subcommands live in `main.rs`, outside the layers).
//! - [`server`]: the only module that imports tonic and the generated code (`server::pb`): services,
//!   health, reflection, the call path both APIs share (`infer`), the one table from errors to gRPC
//!   codes (`status`), the shutdown sequence (`drain`).
//! - [`validate`]: untrusted requests become `Valid*` types here, or a [`validate::ValidationError`]
//!   naming the field, the bound and the value.
//! - [`batcher`]: queues, time windows, token budgets, deadlines and cancellation; no tonic, no candle.
//! - [`engine`]: candle starts here: device choice, the sync model traits, the model's own OS thread.
//! - [`models`]: plain model structs with `forward` (BERT, llama), weights separate from per-request
//!   state, and the CPU kernels (quantized matrix products on a compute team).
//! - [`tokenizer`]: tokenization and truncation, run off the async runtime's workers.
//! - [`registry`]: finds the models in the model directory, loads (each kind's details in its `load`),
//!   swaps and unloads their versions.
//! - [`resources`]: the CPUs and memory the cgroup allows, and the memory plan that sizes the budgets.
//! - [`telemetry`]: the tracing subscriber.
//! - [`metrics`]: Prometheus families every layer records into (plain atomics, no tonic).
//! - [`units`]: durations and byte sizes on the command line, shared by the server's and the clients' flags.
//! - [`client`]: `omnibus bench` (load generator) and `omnibus health`; clients outside the layers above,
//!   using only the generated code.
#![deny(rust_2018_idioms)]

pub mod batcher;
pub mod client;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod models;
pub mod registry;
pub mod resources;
pub mod server;
pub mod telemetry;
pub mod tokenizer;
pub mod units;
pub mod validate;
