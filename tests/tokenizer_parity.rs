//! Tokenizer parity with llama.cpp, id for id: every line of a multilingual corpus from outside the
//! project (prose and code, fortunes in four languages, weekday and month names in fourteen scripts, edge
//! cases of whitespace and special tokens) tokenized by omnibus from each GGUF file's own metadata, against
//! llama.cpp's own tokenizer loaded vocab-only from the same file (`tests/fixtures/make_tokenizer_parity.py`).
//! SmolLM2 is byte-level BPE with the "smollm" pre-tokenizer; Gemma 3 is SentencePiece ("llama") with
//! byte fallback and a 262k vocabulary; two tiny trained BPE vocabularies carry the "llama-bpe" (Llama 3)
//! and "qwen2" (Qwen 2/3) pre-tokenizers. Decoding the ids gives the line back.
use std::path::PathBuf;

use omnibus::engine::load_gguf_tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    lines: Vec<String>,
    models: std::collections::BTreeMap<String, Vec<Vec<u32>>>,
}

#[test]
fn every_line_gets_llama_cpp_s_ids_and_decodes_back() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/tokenizer-parity.json")).unwrap();
    let fx: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fx.lines.len() >= 500, "the corpus has {} lines", fx.lines.len());
    assert_eq!(fx.models.len(), 4);
    for (name, want) in &fx.models {
        // Optional models (fetch.py --with) live in models/optional; the tiny BPE vocabularies are named
        // by their path.
        let path = [root.join("models").join(name), root.join("models/optional").join(name), root.join(name)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("models/{name} is missing: python3 models/fetch.py --with gemma3"));
        let tok = load_gguf_tokenizer(&path).unwrap();
        let mut mismatched = Vec::new();
        for (line, want) in fx.lines.iter().zip(want) {
            let got: Vec<u32> = tok.tokenize(line, false).unwrap().into_iter().map(|(id, _)| id).collect();
            if &got != want {
                mismatched.push(format!("{line:?}\n  omnibus   {got:?}\n  llama.cpp {want:?}"));
                continue;
            }
            // Lines with special tokens written in them decode without those (control tokens are not text).
            if !got.iter().any(|&id| tok.token_bytes(id).is_empty()) {
                let bytes: Vec<u8> = got.iter().flat_map(|&id| tok.token_bytes(id).to_vec()).collect();
                assert_eq!(String::from_utf8_lossy(&bytes), *line, "{name}: decode of encode");
            }
        }
        assert!(
            mismatched.is_empty(),
            "{name}: {} of {} lines differ from llama.cpp, first:\n{}",
            mismatched.len(),
            fx.lines.len(),
            mismatched.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
        );
        println!("{name}: {} lines, all ids equal to llama.cpp's", fx.lines.len());
    }
}
