//! Criterion benchmarks of the hot paths that are ours: batch selection, tokenization, the Q4_1 kernel,
//! and the models' forward pass per batch size. `cargo bench --bench hot_paths` (after
//! `python3 models/fetch.py`); filter with e.g. `-- qmatmul`.
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{Device, Module, Tensor};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use omnibus::batcher::{BatchConfig, Queued, State};
use omnibus::engine::{Embedder, SentenceEmbedder};
use omnibus::models::kernels::qmatmul::QMatrix;
use omnibus::models::llama::{KvCache, Llama, Logits, Step};
use omnibus::tokenizer::{TextTokenizer, Truncation};
use tokio::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn models() -> &'static Path {
    Box::leak(Path::new(env!("CARGO_MANIFEST_DIR")).join("models").into_boxed_path())
}

#[derive(Clone)]
struct Waiting {
    len: usize,
    at: Instant,
}

impl Queued for Waiting {
    fn inputs(&self) -> usize {
        1
    }
    fn tokens(&self) -> usize {
        self.len
    }
    fn enqueued_at(&self) -> Instant {
        self.at
    }
    fn deadline(&self) -> Option<Instant> {
        None
    }
    fn is_abandoned(&self) -> bool {
        false
    }
}

fn batch_selection(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut state = State::new(BatchConfig::default());
    for i in 0..256 {
        state.push(Waiting { len: 8 + (i * 37) % 200, at: t0 });
    }
    c.bench_function("batcher/next_batch of 256 waiting", |b| {
        b.iter_batched(
            || {
                let mut s = State::new(BatchConfig::default());
                for i in 0..256 {
                    s.push(Waiting { len: 8 + (i * 37) % 200, at: t0 });
                }
                s
            },
            |mut s| black_box(s.next_batch(t0 + Duration::from_millis(5), 0)),
            BatchSize::SmallInput,
        )
    });
    drop(state);
}

fn tokenization(c: &mut Criterion) {
    let tok = TextTokenizer::from_file(&models().join("all-MiniLM-L6-v2/tokenizer.json"), 256).unwrap();
    c.bench_function("tokenizer/minilm 10 words", |b| {
        b.iter(|| tok.encode(black_box("The quick brown fox jumps over the lazy dog again"), Truncation::None))
    });
    let long = "tensor cores and queues ".repeat(60);
    c.bench_function("tokenizer/minilm 240 words truncated", |b| {
        b.iter(|| tok.encode(black_box(&long), Truncation::Right))
    });
    let mut file = std::fs::File::open(models().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let gtok = omnibus::engine::gguf_tokenizer(&content.metadata).unwrap();
    c.bench_function("tokenizer/smollm2 240 words", |b| b.iter(|| gtok.encode(black_box(&long))));
}

fn quantized_matmul(c: &mut Criterion) {
    // SmolLM2's FFN shape; each type through our kernel and through candle's QMatMul, same inputs.
    let w = Tensor::randn(0f32, 1.0, (1536, 512), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let ours = QMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        for rows in [1usize, 8, 64] {
            let x: Vec<f32> = (0..rows * 512).map(|i| (i as f32 * 0.37).sin()).collect();
            let xt = Tensor::from_vec(x.clone(), (rows, 512), &Device::Cpu).unwrap();
            c.bench_function(&format!("qmatmul/{dtype:?} 1536x512 x {rows} rows/omnibus"), |b| {
                b.iter(|| black_box(ours.forward(&x, rows)))
            });
            c.bench_function(&format!("qmatmul/{dtype:?} 1536x512 x {rows} rows/candle"), |b| {
                b.iter(|| black_box(candle.forward(&xt).unwrap()))
            });
        }
    }
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    let dir = models().join("all-MiniLM-L6-v2");
    let (mut bert, info) = SentenceEmbedder::load(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens).unwrap();
    let ids = tok.encode("The quick brown fox jumps over the lazy dog again", Truncation::None).unwrap();
    for batch in [1usize, 8, 32] {
        let inputs = vec![ids.clone(); batch];
        g.bench_function(format!("minilm 12 tokens x {batch}"), |b| b.iter(|| bert.embed(&inputs).unwrap()));
    }
    let mut file = std::fs::File::open(models().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let llama = Llama::load(&content, &mut file, &Device::Cpu).unwrap();
    for batch in [1usize, 4, 8, 16] {
        // One decode step of `batch` sequences, each with 32 positions already cached.
        let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new(&llama.config)).collect();
        let prompt: Vec<u32> = (100..132).collect();
        for cache in caches.iter_mut() {
            llama.forward(&mut [Step { tokens: &prompt, cache, logits: Logits::None }]).unwrap();
        }
        g.bench_function(format!("smollm2 decode step x {batch}"), |b| {
            b.iter_batched(
                || caches.clone(),
                |mut caches| {
                    let tokens = [42u32];
                    let mut steps: Vec<Step<'_>> =
                        caches.iter_mut().map(|cache| Step { tokens: &tokens, cache, logits: Logits::Last }).collect();
                    black_box(llama.forward(&mut steps).unwrap())
                },
                BatchSize::LargeInput,
            )
        });
    }
    let prompt: Vec<u32> = (1000..1256).collect();
    g.bench_function("smollm2 prefill 256 tokens", |b| {
        b.iter(|| {
            let mut cache = KvCache::new(&llama.config);
            black_box(llama.forward(&mut [Step { tokens: &prompt, cache: &mut cache, logits: Logits::Last }]).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, batch_selection, tokenization, quantized_matmul, forward);
criterion_main!(benches);
