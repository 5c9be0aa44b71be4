//! Every decoder architecture omnibus serves, against llama.cpp on a tiny random-weight GGUF of that
//! architecture with every structural feature switched on (`tests/fixtures/make_tiny_archs.py`: GQA,
//! Llama 3.1 RoPE factors and linear scaling, Qwen 2 biases, Qwen 3 Q/K norms and wide heads, Phi-3 fused
//! weights, Gemma 3 sliding windows, post-norms and GeGLU). The weights are f32, so the engines differ
//! only by float order: the full-vocabulary KL divergence must be tiny and the top token the same. A
//! structural mistake (a missing bias, the wrong RoPE pairing, a window off by one) moves it by orders
//! of magnitude. And exact against ourselves: each architecture's rows are the same bits in a batch.
//! The device-generic decoder (candle's ops, what GPUs run; here on candle's CPU backend) is held to the
//! same checks (`device_generic_every_architecture_...`).
use std::path::PathBuf;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use omnibus::models::llama::{Decoder, Llama, Logits, Step};
use omnibus::models::llama_device::DeviceLlama;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    ids: Vec<u32>,
    models: std::collections::BTreeMap<String, Reference>,
}

#[derive(Deserialize)]
struct Reference {
    file: String,
    logprobs: Vec<Vec<f64>>,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn every_architecture_matches_llama_cpp_and_is_batch_invariant() {
    every_architecture::<Llama>();
}

#[test]
fn device_generic_every_architecture_matches_llama_cpp_and_is_batch_invariant() {
    every_architecture::<DeviceLlama>();
}

fn every_architecture<D: Decoder>() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(dir.join("tiny-archs.json")).unwrap()).unwrap();
    let archs: Vec<&str> = fx.models.keys().map(String::as_str).collect();
    assert_eq!(archs, ["gemma3", "llama", "phi3", "qwen2", "qwen3"]);
    for (arch, r) in &fx.models {
        let mut file = std::fs::File::open(dir.join(&r.file)).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let model = D::load(&content, &mut file, &Device::Cpu).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(model.config().arch, *arch);
        let vocab = model.config().vocab_size;
        let mut cache = model.new_cache().unwrap();
        let out = model.forward(&mut [Step { tokens: &fx.ids, cache: &mut cache, logits: Logits::All }]).unwrap();
        let logits = out[0].as_ref().unwrap();
        let (mut kl_sum, mut kl_max, mut same) = (0f64, 0f64, 0);
        for (i, p) in r.logprobs.iter().enumerate() {
            let q = log_softmax(&logits[i * vocab..(i + 1) * vocab]);
            let kl: f64 = p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum();
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            same += (argmax(p) == argmax(&q)) as usize;
        }
        let n = r.logprobs.len();
        let decoder = std::any::type_name::<D>().rsplit("::").next().unwrap();
        println!("{arch} ({decoder}): mean KLD {:.2e}, max {:.2e}, same top {same}/{n}", kl_sum / n as f64, kl_max);
        // f32 weights both sides; the references are rounded to 1e-6, which alone gives KL ~1e-12.
        assert!(
            kl_sum / n as f64 <= 1e-6 && kl_max <= 1e-5,
            "{arch}: mean KLD {:e}, max {kl_max:e}",
            kl_sum / n as f64
        );
        assert!(same + 1 >= n, "{arch}: same top token at {same} of {n} positions");

        // Batch invariance: the sequence fed in two pieces beside another sequence (different ids, its
        // own lengths) gives the same bits as alone.
        let (a, b) = fx.ids.split_at(17);
        let other: Vec<u32> = fx.ids.iter().rev().copied().collect();
        let (mut c1, mut c2) = (model.new_cache().unwrap(), model.new_cache().unwrap());
        model.forward(&mut [Step { tokens: a, cache: &mut c1, logits: Logits::None }]).unwrap();
        let out = model
            .forward(&mut [
                Step { tokens: &other[..9], cache: &mut c2, logits: Logits::All },
                Step { tokens: b, cache: &mut c1, logits: Logits::All },
            ])
            .unwrap();
        let batched = out[1].as_ref().unwrap();
        assert!(batched[..] == logits[a.len() * vocab..], "{arch}: rows differ in a batch from alone");
    }
}
