//! The SentencePiece-style tokenizer of GGUF files whose `tokenizer.ggml.model` is "llama" (Llama 2,
//! Mistral, TinyLlama, Gemma), as llama.cpp implements it (`llm_tokenizer_spm`): spaces become U+2581,
//! the text starts as one symbol per UTF-8 character, and adjacent symbols whose concatenation is in the
//! vocabulary merge, highest score first (ties: leftmost); what never forms a token falls back to its
//! bytes (`<0xXX>` tokens). Special tokens in the text are split out first, longest first.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A symbol of the text being merged: a byte range, and its neighbours in the linked list.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// A max-heap pops the highest score, then the leftmost pair (llama.cpp's comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

pub struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// Token id of each byte (`<0xXX>`), where the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    /// Special tokens split out of text before merging, longest first.
    specials: Vec<(String, u32)>,
    add_space_prefix: bool,
}

pub const SPACE: char = '\u{2581}';

impl Spm {
    /// `special`: the tokens recognised in text as themselves (control, user-defined, unknown).
    pub fn new(tokens: &[String], scores: Vec<f32>, special: Vec<(String, u32)>, add_space_prefix: bool) -> Self {
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let byte_ids = std::array::from_fn(|b| {
            ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                // llama.cpp falls back to the byte as a one-character token.
                (b < 128).then(|| ids.get(&(b as u8 as char).to_string()).copied()).flatten()
            })
        });
        let mut specials: Vec<(String, u32)> = special.into_iter().filter(|(s, _)| !s.is_empty()).collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Self { ids, scores, byte_ids, specials, add_space_prefix }
    }

    /// The ids of `text` (no BOS/EOS; the caller adds them).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // Fragments: raw text, or a special token. Each special token, longest first, splits every raw
        // fragment at its occurrences (llama.cpp's tokenizer_st_partition).
        enum Frag<'a> {
            Raw(&'a str),
            Token(u32),
        }
        let mut frags = vec![Frag::Raw(text)];
        for (s, id) in &self.specials {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Raw(mut t) => {
                        while let Some(i) = t.find(s.as_str()) {
                            if i > 0 {
                                next.push(Frag::Raw(&t[..i]));
                            }
                            next.push(Frag::Token(*id));
                            t = &t[i + s.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Frag::Raw(t));
                        }
                    }
                    token => next.push(token),
                }
            }
            frags = next;
        }
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Raw(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(SPACE);
                    }
                    for c in t.chars() {
                        s.push(if c == ' ' { SPACE } else { c });
                    }
                    self.merge(&s, &mut out);
                    prev_special = false;
                }
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        out
    }

    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
        }
        let Some(last) = symbols.last_mut() else { return };
        last.next = None;
        let mut queue = BinaryHeap::new();
        let try_add =
            |left: Option<usize>, right: Option<usize>, symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>| {
                let (Some(l), Some(r)) = (left, right) else { return };
                let (a, b) = (symbols[l], symbols[r]);
                let piece = &text[a.start..a.start + a.len + b.len];
                let Some(&id) = self.ids.get(piece) else { return };
                let Some(&score) = self.scores.get(id as usize) else { return };
                queue.push(Bigram { left: l, right: r, score, len: piece.len() });
            };
        for i in 1..symbols.len() {
            try_add(Some(i - 1), Some(i), &symbols, &mut queue);
        }
        while let Some(bg) = queue.pop() {
            let (l, r) = (symbols[bg.left], symbols[bg.right]);
            // One side already merged into something else: stale.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.len {
                continue;
            }
            symbols[bg.left].len += r.len;
            symbols[bg.right].len = 0;
            symbols[bg.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(bg.left);
            }
            let left = symbols[bg.left];
            try_add(left.prev, Some(bg.left), &symbols, &mut queue);
            try_add(Some(bg.left), left.next, &symbols, &mut queue);
        }
        // Every merged symbol is a token (a pair enters the queue only if it is one), so only single
        // characters can be missing from the vocabulary; llama.cpp's `resegment` then finds no merge to
        // undo and emits their bytes, as here.
        let mut i = Some(0);
        while let Some(s) = i {
            let piece = &text[symbols[s].start..symbols[s].start + symbols[s].len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // A vocabulary without byte tokens has nothing better (llama.cpp would throw).
                None => out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize])),
            }
            i = symbols[s].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> Spm {
        let mut tokens: Vec<String> = pieces.iter().map(|(p, _)| p.to_string()).collect();
        let mut scores: Vec<f32> = pieces.iter().map(|(_, s)| *s).collect();
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
        }
        let n = tokens.len() as u32;
        tokens.push("<eot>".into());
        scores.push(0.0);
        Spm::new(&tokens, scores, vec![("<eot>".into(), n)], false)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let v = vocab(&[("a", -1.0), ("b", -1.0), ("ab", -2.0), ("\u{2581}", -1.0), ("\u{2581}ab", -0.5), ("c", -1.0)]);
        // "ab" merges first (the only pair), then "▁" + "ab".
        assert_eq!(v.encode(" ab"), vec![4]);
        // "é" is not in the vocabulary: its two bytes.
        let e = "é".as_bytes();
        assert_eq!(v.encode("cé"), vec![5, 6 + e[0] as u32, 6 + e[1] as u32]);
        // Special tokens are split out whole.
        assert_eq!(v.encode("a<eot>b"), vec![0, 6 + 256, 1]);
    }

    #[test]
    fn ties_merge_the_leftmost_pair_first() {
        // "aaa": "aa" can form at 0 or 1, same score; the left pair wins, leaving "aa" + "a".
        let v = vocab(&[("a", -1.0), ("aa", -1.0)]);
        assert_eq!(v.encode("aaa"), vec![1, 0]);
    }
}
