//! The embedding model's forward pass in-process (no gRPC): the ceiling the server's Predict throughput
//! is measured against. Run: `cargo bench --bench embed_forward` (after `python3 models/fetch.py`).
//! Prints medians of repeated runs.
//!
//! - `corpus`: batches of 1, 8, 32 and 128 consecutive texts of `benches/corpus/tune.txt` (or
//!   `--corpus heldout`), the realistic mix of lengths, languages and code; sentences/s over the whole
//!   corpus.
//! - `mixed`: 15 short texts and one long one in a batch, beside 16 short and 16 long: with packed
//!   batches a mixed batch costs what its tokens cost (it cost 16x a uniform batch when padded).
//! - `uniform`: 12-token and 128-token inputs, batches of 1 to 128 (the old rows, kept for comparison).
//!
//! Filter with the group's name: `cargo bench --bench embed_forward -- mixed`.
use std::path::Path;
use std::time::Instant;

use omnibus::engine::{Embedder, SentenceEmbedder};
use omnibus::tokenizer::{TextTokenizer, Truncation};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    omnibus::models::kernels::cpu::flush_denormals();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/all-MiniLM-L6-v2");
    let (mut model, info) =
        SentenceEmbedder::load(&dir, &candle_core::Device::Cpu).expect("run python3 models/fetch.py first");
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens).unwrap();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let corpus_name = args.iter().position(|a| a == "--corpus").and_then(|i| args.get(i + 1)).map_or("tune", |s| s);
    let wanted = |group: &str| {
        let filters: Vec<&String> =
            args.iter().filter(|a| !a.starts_with("--") && *a != corpus_name && *a != "--bench").collect();
        filters.is_empty() || filters.iter().any(|f| *f == group)
    };
    println!(
        "SIMD path: {}, compute threads: {}",
        omnibus::models::kernels::cpu::describe(),
        rayon::current_num_threads()
    );

    let text = std::fs::read_to_string(root.join(format!("benches/corpus/{corpus_name}.txt"))).unwrap();
    let corpus: Vec<Vec<u32>> = text.lines().map(|l| tok.encode(l, Truncation::Right).unwrap()).collect();
    if wanted("corpus") {
        let tokens: usize = corpus.iter().map(Vec::len).sum();
        println!("corpus {corpus_name}: {} texts, {tokens} tokens", corpus.len());
        for batch in [1usize, 8, 32, 128] {
            let secs = median_secs(3, || {
                for chunk in corpus.chunks(batch) {
                    model.embed(chunk).unwrap();
                }
            });
            println!("corpus   batch {batch:3}: {:8.1} sentences/s", corpus.len() as f64 / secs);
        }
    }
    if wanted("mixed") {
        let mut by_len = corpus.clone();
        by_len.sort_by_key(Vec::len);
        let (short, long) = (by_len[by_len.len() / 4].clone(), by_len[by_len.len() - 1].clone());
        let cases = [
            ("16 short", vec![short.clone(); 16]),
            ("16 long", vec![long.clone(); 16]),
            ("15 short + 1 long", [vec![short.clone(); 15], vec![long.clone()]].concat()),
        ];
        for (name, batch) in cases {
            let tokens: usize = batch.iter().map(Vec::len).sum();
            let secs = median_secs(9, || {
                model.embed(&batch).unwrap();
            });
            println!(
                "mixed    {name:18} ({tokens:4} tokens): {:7.2} ms, {:6.1} us/token",
                secs * 1e3,
                secs * 1e6 / tokens as f64
            );
        }
    }
    if wanted("uniform") {
        let short = tok.encode("The quick brown fox jumps over the lazy dog again", Truncation::None).unwrap();
        let long = tok.encode(&"tensor ".repeat(126), Truncation::None).unwrap();
        for (name, seq) in [("short", &short), ("long", &long)] {
            for batch in [1usize, 8, 32, 128] {
                let inputs: Vec<Vec<u32>> = vec![seq.clone(); batch];
                let reps = if name == "long" && batch >= 32 { 3 } else { 9 };
                let secs = median_secs(reps, || {
                    model.embed(&inputs).unwrap();
                });
                println!(
                    "uniform  {name:5} ({:3} tokens) batch {batch:3}: {:8.2} ms  {:8.1} sentences/s",
                    seq.len(),
                    secs * 1e3,
                    batch as f64 / secs
                );
            }
        }
    }
}
