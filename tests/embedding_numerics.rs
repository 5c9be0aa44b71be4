//! The embedding model in-process on the realistic corpus: sentence-transformers' vectors (cosine >=
//! 0.9999, their token ids exactly), and a sentence's vector bit-identical alone and in any batch. CI
//! runs this once per SIMD path the machine has (`OMNIBUS_CPU_FEATURES`, see `.ci/run`).
//! The device-generic encoder (candle's ops on the same packed layout, what GPUs run) is held to the same
//! cosine, and to the same vector alone and in any batch within 1e-5 (`device_generic_*`).
use std::path::PathBuf;

use omnibus::engine::{Embedder, EncoderPath, SentenceEmbedder, l2_normalize};
use omnibus::models::kernels::cpu;
use omnibus::tokenizer::{TextTokenizer, Truncation};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    vectors: Vec<Vec<f32>>,
}

fn load() -> (SentenceEmbedder, TextTokenizer, Reference) {
    load_on(EncoderPath::Kernels)
}

fn load_on(path: EncoderPath) -> (SentenceEmbedder, TextTokenizer, Reference) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let (model, info) =
        SentenceEmbedder::load_on(&dir, &candle_core::Device::Cpu, Some(path)).expect("run python3 models/fetch.py");
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/embeddings-corpus.json");
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    (model, tok, r)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn the_corpus_matches_sentence_transformers() {
    matches_sentence_transformers(EncoderPath::Kernels);
}

#[test]
fn device_generic_the_corpus_matches_sentence_transformers() {
    matches_sentence_transformers(EncoderPath::DeviceGeneric);
}

fn matches_sentence_transformers(path: EncoderPath) {
    let (mut model, tok, r) = load_on(path);
    let ids: Vec<Vec<u32>> = r.sentences.iter().map(|s| tok.encode(s, Truncation::Right).unwrap()).collect();
    for (i, (got, want)) in ids.iter().zip(&r.token_ids).enumerate() {
        assert_eq!(got, want, "text {i}: token ids differ from the Hugging Face tokenizer's");
    }
    // All 64 in one batch: lengths from 4 to over 100 tokens, seven languages and code.
    let mut vectors = model.embed(&ids).unwrap();
    let mut worst = 1f64;
    for (i, (v, want)) in vectors.iter_mut().zip(&r.vectors).enumerate() {
        l2_normalize(v);
        let c = cosine(v, want);
        worst = worst.min(c);
        assert!(c >= 0.9999, "text {i} ({:?}): cosine {c} on path {}", r.sentences[i], cpu::describe());
    }
    eprintln!("{path:?}: {} texts, worst cosine {worst:.7} on path {}", ids.len(), cpu::describe());
}

#[test]
fn a_text_gets_the_same_bits_alone_and_in_any_batch() {
    let (mut model, tok, r) = load();
    let ids: Vec<Vec<u32>> = r.sentences.iter().map(|s| tok.encode(s, Truncation::Right).unwrap()).collect();
    let alone: Vec<Vec<f32>> = ids.iter().map(|s| model.embed(std::slice::from_ref(s)).unwrap().remove(0)).collect();
    let all = model.embed(&ids).unwrap();
    // Other company: reversed, in odd-sized groups, each text beside different neighbours.
    let mut reversed: Vec<Vec<u32>> = ids.clone();
    reversed.reverse();
    let mut grouped = Vec::new();
    for group in reversed.chunks(7) {
        grouped.extend(model.embed(group).unwrap());
    }
    grouped.reverse();
    for i in 0..ids.len() {
        assert_eq!(all[i], alone[i], "text {i}: the 64-text batch differs from the text alone");
        assert_eq!(grouped[i], alone[i], "text {i}: a 7-text batch differs from the text alone");
    }
}

#[test]
fn device_generic_a_text_gets_the_same_vector_alone_and_in_any_batch() {
    let (mut model, tok, r) = load_on(EncoderPath::DeviceGeneric);
    let ids: Vec<Vec<u32>> = r.sentences.iter().map(|s| tok.encode(s, Truncation::Right).unwrap()).collect();
    let alone: Vec<Vec<f32>> = ids.iter().map(|s| model.embed(std::slice::from_ref(s)).unwrap().remove(0)).collect();
    let all = model.embed(&ids).unwrap();
    let mut worst = 0f32;
    for i in 0..ids.len() {
        let d = all[i].iter().zip(&alone[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
    }
    eprintln!("device-generic: largest difference alone vs in the 64-text batch {worst:e}");
    // candle's matrix products change float order with the row count, so bits may differ; the packed
    // layout keeps the difference at rounding level (padding would add masked positions' noise).
    assert!(worst <= 1e-5, "a text's vector moved by {worst} in a batch");
}
