//! The guard against subnormal floats in the encoder (they cost a ~100-cycle microcode assist per
//! operation on Intel cores; a mixed batch once ran 4x slower for them). Its own test binary, with a
//! one-thread compute team: everything runs on the test's thread, which does not flush subnormals, so
//! any the kernels make are seen, not hidden by the workers' flush-to-zero.
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use omnibus::models::bert::BertConfig;
use omnibus::models::bert_packed::PackedBert;
use omnibus::tokenizer::{TextTokenizer, Truncation};

#[test]
fn a_mixed_length_batch_makes_no_subnormals() {
    // SAFETY: set before any other thread of this test binary exists or reads it; the team and rayon's
    // pool read it once, on first use.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    assert!(!omnibus::models::kernels::cpu::denormals_flushed(), "the test thread must keep subnormals to see them");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let config: BertConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let model = PackedBert::load(&dir.join("model.safetensors"), config).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/corpus/tune.txt")).unwrap();
    // 15 short texts and one long one (the batch that cost 16x a uniform one), then 32 mixed.
    let mut lines: Vec<&str> = corpus.lines().collect();
    lines.sort_by_key(|l| l.len());
    let mut batch: Vec<&str> = lines[..15].to_vec();
    batch.push(lines[lines.len() - 1]);
    batch.extend(corpus.lines().take(32));
    let ids: Vec<Vec<u32>> = batch.iter().map(|s| tok.encode(s, Truncation::Right).unwrap()).collect();
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let found = AtomicUsize::new(0);
    let hidden = model.forward_counting(&seqs, Some(&found)).unwrap();
    assert!(hidden.iter().all(|v| v.is_finite()));
    assert_eq!(found.load(Ordering::Relaxed), 0, "subnormal floats in attention probabilities or layer outputs");
}
