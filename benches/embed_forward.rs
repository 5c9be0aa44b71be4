//! The embedding model's forward pass per batch size, in-process (no gRPC): the ceiling the server's
//! Predict throughput is measured against. Run: `cargo bench --bench embed_forward` (after
//! `python3 models/fetch.py`). Prints medians of repeated runs.
use std::path::Path;
use std::time::Instant;

use omnibus::engine::{Embedder, SentenceEmbedder};
use omnibus::tokenizer::{TextTokenizer, Truncation};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let device = candle_core::Device::Cpu;
    let (mut model, info) = SentenceEmbedder::load(&dir, &device).expect("run python3 models/fetch.py first");
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens).unwrap();
    let short = tok.encode("The quick brown fox jumps over the lazy dog again", Truncation::None).unwrap();
    let long = tok.encode(&"tensor ".repeat(126), Truncation::None).unwrap();
    // Optional filters: `cargo bench --bench embed_forward -- long 32`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    for (name, seq) in [("short", &short), ("long", &long)] {
        if args.first().is_some_and(|a| a != name) {
            continue;
        }
        for batch in [1usize, 8, 32, 128] {
            if args.get(1).is_some_and(|b| b.parse() != Ok(batch)) {
                continue;
            }
            let inputs: Vec<Vec<u32>> = vec![seq.clone(); batch];
            model.embed(&inputs).unwrap();
            let reps = if name == "long" && batch >= 32 { 3 } else { 9 };
            let mut times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    model.embed(&inputs).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!(
                "{name:5} ({:3} tokens) batch {batch:3}: {:8.2} ms  {:8.1} sentences/s",
                seq.len(),
                median * 1e3,
                batch as f64 / median
            );
        }
    }
}
