//! Text to token ids for embedding models, with the model's length limit applied as the request asks.
//! Callers run it off the async runtime's workers (it is CPU work). [`gguf`] builds a generation model's
//! tokenizer from its GGUF metadata and detokenizes incrementally.
pub mod chat;
pub mod gguf;
pub mod spm;

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Which end of an over-long input to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep everything; the caller rejects inputs over the limit.
    None,
    /// Keep the start (sentence-transformers' behaviour).
    Right,
    /// Keep the end.
    Left,
}

/// The most bytes of text per token of a model's window that are ever tokenized. Real text averages 3
/// to 5 bytes a token; only pathological input (a megabyte without a space) comes near this. It bounds
/// the CPU a request can buy before it is refused or cut: tokenizing costs about 0.65 s per MB.
pub const MAX_BYTES_PER_TOKEN: usize = 64;

/// One tokenizer per truncation mode: `tokenizers` keeps truncation as configuration rather than a call
/// argument, and three small copies are cheaper than a lock around one mutable instance.
pub struct TextTokenizer {
    plain: Tokenizer,
    right: Tokenizer,
    left: Tokenizer,
    max_tokens: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; truncation cuts to `max_tokens`, special tokens included.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self, TokenizerError> {
        let load_err = |reason: String| TokenizerError::Load { path: path.display().to_string(), reason };
        let mut plain = Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        // tokenizer.json files often carry the exporter's padding and truncation; the batcher pads and
        // the request decides truncation, so both are cleared.
        plain.with_padding(None);
        plain.with_truncation(None).map_err(|e| load_err(e.to_string()))?;
        let with = |direction| -> Result<Tokenizer, TokenizerError> {
            let mut t = plain.clone();
            t.with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                direction,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| load_err(e.to_string()))?;
            Ok(t)
        };
        let right = with(TruncationDirection::Right)?;
        let left = with(TruncationDirection::Left)?;
        Ok(Self { plain, right, left, max_tokens })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The longest text, in bytes, that is tokenized whole (see [`MAX_BYTES_PER_TOKEN`]).
    pub fn max_bytes(&self) -> usize {
        self.max_tokens * MAX_BYTES_PER_TOKEN
    }

    /// Token ids with the model's special tokens ([CLS] ... [SEP] for BERT). With truncation, only as
    /// much of the text is tokenized as the window needs: a prefix (or, keeping the end, a suffix) cut
    /// at whitespace, growing until it holds more tokens than the window, at most [`Self::max_bytes`];
    /// tokens never cross whitespace, so the kept tokens are the same as the whole text's. Without
    /// truncation the caller refuses text over [`Self::max_bytes`] before calling this.
    pub fn encode(&self, text: &str, truncation: Truncation) -> Result<Vec<u32>, TokenizerError> {
        let (t, cut): (_, fn(&str, usize) -> &str) = match truncation {
            Truncation::None => return self.encode_with(&self.plain, text),
            Truncation::Right => (&self.right, prefix),
            Truncation::Left => (&self.left, suffix),
        };
        let mut budget = self.max_tokens * 8;
        loop {
            if text.len() <= budget {
                return self.encode_with(t, text);
            }
            let part = cut(text, budget);
            if budget >= self.max_bytes() || self.encode_with(&self.plain, part)?.len() > self.max_tokens {
                return self.encode_with(t, part);
            }
            budget = (budget * 4).min(self.max_bytes());
        }
    }

    fn encode_with(&self, t: &Tokenizer, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = t.encode(text, true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Every token of `text` (no truncation) with its piece of the input (a special token: its name),
    /// for the Tokenize RPC. The caller bounds the text's length.
    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<(u32, String)>, TokenizerError> {
        let enc = self.plain.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let specials = enc.get_special_tokens_mask();
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .zip(specials)
            .map(|(((&id, name), &(a, b)), &special)| {
                let piece = if special == 1 { name.clone() } else { text.get(a..b).unwrap_or(name).to_string() };
                (id, piece)
            })
            .collect())
    }

    /// Ids of a minimal input (just the special tokens), for warm-up passes.
    pub fn minimal(&self) -> Result<Vec<u32>, TokenizerError> {
        self.encode("", Truncation::None)
    }
}

/// At most `max` bytes from the start of `text`, ending before its last whitespace, so no word is cut in
/// two (a text without whitespace is cut at a character boundary).
pub(crate) fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let head = &text[..end];
    match head.rfind(char::is_whitespace) {
        Some(i) if i > 0 => &head[..i],
        _ => head,
    }
}

/// At most `max` bytes from the end of `text`, starting at its first whitespace, so no word is cut in two
/// (a text without whitespace is cut at a character boundary).
pub(crate) fn suffix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    match tail.find(char::is_whitespace) {
        Some(i) => &tail[i..],
        None => tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_land_on_whitespace_or_char_boundaries() {
        assert_eq!(prefix("short", 10), "short");
        assert_eq!(prefix("one two three four", 12), "one two");
        assert_eq!(suffix("one two three four", 12), " three four");
        // No whitespace near the cut: a character boundary, never inside a multi-byte character.
        assert_eq!(prefix("ééééé", 5), "éé");
        assert_eq!(suffix("ééééé", 5), "éé");
        assert_eq!(prefix("abcdefgh", 4), "abcd");
    }

    fn minilm() -> Option<TextTokenizer> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/tokenizer.json");
        p.exists().then(|| TextTokenizer::from_file(&p, 256).unwrap())
    }

    /// Tokenizing a prefix gives the same ids as tokenizing the whole text and truncating, on real text
    /// around every cut, and a 60 MB input costs what its prefix costs.
    #[test]
    fn truncation_reads_only_what_the_window_needs() {
        let Some(tok) = minilm() else { return };
        let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/corpus/tune.txt")).unwrap();
        let long: String = corpus.lines().collect::<Vec<_>>().join(" ");
        for len in [100, 1500, 2048, 2100, 5000, 9000, 30_000, long.len()] {
            let text = prefix(&long, len);
            for dir in [Truncation::Right, Truncation::Left] {
                let whole =
                    tok.encode_with(if dir == Truncation::Right { &tok.right } else { &tok.left }, text).unwrap();
                assert_eq!(tok.encode(text, dir).unwrap(), whole, "{len} bytes, {dir:?}");
            }
        }
        let huge = "word ".repeat(12_000_000);
        let started = std::time::Instant::now();
        assert_eq!(tok.encode(&huge, Truncation::Right).unwrap().len(), 256);
        assert_eq!(tok.encode(&huge, Truncation::Left).unwrap().len(), 256);
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
