//! Greedy decoding of the real SmolLM2 GGUF against llama.cpp's token ids, and batched == solo for every
//! architecture (SmolLM2's llama, Gemma 3's sliding windows and Q/K norms).
use std::path::PathBuf;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use omnibus::models::llama::{KvCache, Llama, Logits, Step};
use omnibus::tokenizer::gguf::GgufTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    prompt: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
}

fn load() -> (Llama, GgufTokenizer, Vec<Case>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&path).expect("run python3 models/fetch.py first");
    let content = gguf_file::Content::read(&mut file).unwrap();
    let model = Llama::load(&content, &mut file, &Device::Cpu).unwrap();
    let tok = omnibus::engine::gguf_tokenizer(&content.metadata).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generation.json")).unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();
    (model, tok, r.cases)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn greedy_alone(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = KvCache::new(&model.config);
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(&mut [Step { tokens: &next, cache: &mut cache, logits: Logits::Last }]).unwrap();
        let t = argmax(logits[0].as_ref().unwrap());
        out.push(t);
        next = vec![t];
    }
    out
}

#[test]
fn tokenizer_and_greedy_tokens_match_llama_cpp() {
    let (model, tok, cases) = load();
    for case in &cases {
        assert_eq!(tok.encode(&case.prompt).unwrap(), case.prompt_token_ids, "prompt {:?}", case.prompt);
        let got = greedy_alone(&model, &case.prompt_token_ids, case.token_ids.len());
        assert_eq!(got, case.token_ids, "prompt {:?}", case.prompt);
    }
}

#[test]
fn sequences_decode_the_same_in_a_batch_joined_at_different_steps() {
    let (model, _tok, cases) = load();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_token_ids.clone()).collect();
    let out = batched_equals_solo(&model, &prompts);
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(out[i], case.token_ids, "case {i} in a batch");
    }
}

#[test]
fn gemma3_sequences_decode_the_same_in_a_batch_joined_at_different_steps() {
    let (_, _, cases) = load();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/optional/gemma-3-270m-q4_k_m.gguf");
    let mut file = std::fs::File::open(&path).expect("python3 models/fetch.py --with gemma3");
    let content = gguf_file::Content::read(&mut file).unwrap();
    let model = Llama::load(&content, &mut file, &Device::Cpu).unwrap();
    let tok = omnibus::engine::gguf_tokenizer(&content.metadata).unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| tok.encode(&c.prompt).unwrap()).collect();
    assert_eq!(prompts[0][0], tok.bos.unwrap(), "Gemma's prompts start with BOS");
    batched_equals_solo(&model, &prompts);
}

/// Greedy-decodes each prompt alone, then all together with the second joining after 5 steps and the
/// third after 9, and asserts every batched row's logits are the alone run's bits. Returns the tokens.
fn batched_equals_solo(model: &Llama, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let n = 24;
    // Case 0 starts alone; case 1 joins after 5 steps (its whole prompt as one prefill chunk beside
    // case 0's decode row); case 2 joins after 9 steps.
    let joins = [0usize, 5, 9];
    // Each case alone first: its logits at every step.
    let solo: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = KvCache::new(&model.config);
            let mut next = p.clone();
            (0..n)
                .map(|_| {
                    let l =
                        model.forward(&mut [Step { tokens: &next, cache: &mut cache, logits: Logits::Last }]).unwrap();
                    let row = l[0].clone().unwrap();
                    next = vec![argmax(&row)];
                    row
                })
                .collect()
        })
        .collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(&model.config)).collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0..(n + 9) {
        let active: Vec<usize> = (0..prompts.len()).filter(|&i| step >= joins[i] && out[i].len() < n).collect();
        if active.is_empty() {
            break;
        }
        let mut steps = Vec::new();
        let mut caches_iter: Vec<(usize, &mut KvCache)> =
            caches.iter_mut().enumerate().filter(|(i, _)| active.contains(i)).collect();
        for (i, cache) in caches_iter.iter_mut() {
            steps.push(Step { tokens: &next[*i], cache: &mut **cache, logits: Logits::Last });
        }
        let logits = model.forward(&mut steps).unwrap();
        drop(steps);
        for (k, &i) in active.iter().enumerate() {
            let row = logits[k].as_ref().unwrap();
            let t = argmax(row);
            // Exact against ourselves: the same bits as the sequence alone, whatever ran beside it.
            let alone = &solo[i][out[i].len()];
            assert!(row == alone, "case {i} step {}: batched logits differ from alone", out[i].len());
            out[i].push(t);
            next[i] = vec![t];
        }
    }
    out
}
