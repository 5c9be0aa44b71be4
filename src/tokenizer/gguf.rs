//! The tokenizer of a GGUF file, built from its own metadata (vocabulary, merges or scores, token
//! types, pre-tokenizer name, special ids), so the one file is enough: byte-level BPE ("gpt2") through
//! `tokenizers`, SentencePiece-style ("llama") through [`super::spm`]; and incremental detokenization
//! that emits text only in whole UTF-8 characters.
use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::TokenizerError;
use super::spm::{self, Spm};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_BYTE: i32 = 6;

/// Llama 3's pre-tokenizer regex (`tokenizers`' ByteLevel applies GPT-2's own when use_regex is on).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's (also Qwen 3's): Llama 3's with single digits, as llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 has it.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Names of control tokens that end a generation besides the declared EOS (llama.cpp's EOG list).
const END_OF_GENERATION: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>", "<|eom_id|>"];

/// The two tokenizer models GGUF files carry.
enum Model {
    Bpe(Box<Tokenizer>),
    Spm(Box<Spm>),
}

pub struct GgufTokenizer {
    model: Model,
    add_eos: bool,
    /// Each token's bytes as it appears in text (control tokens: none).
    bytes: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end a generation.
    pub end_of_generation: Vec<u32>,
    pub chat_template: Option<String>,
    /// Text of each token, for chat-template variables like `bos_token`.
    tokens: Vec<String>,
}

fn err(reason: impl ToString) -> TokenizerError {
    TokenizerError::Load { path: "GGUF metadata".into(), reason: reason.to_string() }
}

/// The tokenizer keys of a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as
/// plain values: the engine reads the file, this module only builds the tokenizer from them.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece merge priorities).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`; every token normal when absent.
    pub token_types: Option<Vec<i32>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; llama.cpp's default is true).
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

/// GPT-2's byte-to-unicode table, reversed: the printable stand-in of each byte back to the byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable.into_iter().zip(chars).map(|(b, c)| (char::from_u32(c).unwrap(), b as u8)).collect()
}

impl GgufTokenizer {
    pub fn new(vocab: GgufVocab) -> Result<Self, TokenizerError> {
        let GgufVocab {
            model,
            pre,
            tokens,
            merges,
            scores,
            token_types,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            chat_template,
        } = vocab;
        if tokens.is_empty() {
            return Err(err("no tokenizer.ggml.tokens"));
        }
        let types = token_types.unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(err(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let (model, bytes) = match model.as_str() {
            "gpt2" => Self::bpe(&tokens, &types, &merges, pre)?,
            "llama" => {
                if scores.len() != tokens.len() {
                    return Err(err(format!("{} tokenizer.ggml.scores for {} tokens", scores.len(), tokens.len())));
                }
                let special = tokens
                    .iter()
                    .zip(&types)
                    .enumerate()
                    .filter(|(_, (_, t))| matches!(**t, TOKEN_CONTROL | TOKEN_USER_DEFINED | TOKEN_UNKNOWN))
                    .map(|(i, (s, _))| (s.clone(), i as u32))
                    .collect();
                let spm = Spm::new(&tokens, scores, special, add_space_prefix.unwrap_or(true));
                // llama.cpp's token_to_piece for SPM: normal and user-defined tokens with U+2581 as a
                // space, byte tokens as their byte, anything else (control, unknown) as nothing.
                let bytes = tokens
                    .iter()
                    .zip(&types)
                    .map(|(s, &t)| match t {
                        TOKEN_NORMAL | TOKEN_USER_DEFINED => s.replace(spm::SPACE, " ").into_bytes(),
                        TOKEN_BYTE => s
                            .strip_prefix("<0x")
                            .and_then(|h| h.strip_suffix('>'))
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                            .map(|b| vec![b])
                            .unwrap_or_default(),
                        _ => Vec::new(),
                    })
                    .collect();
                (Model::Spm(Box::new(spm)), bytes)
            }
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model {other:?} is not supported (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
                )));
            }
        };
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for (i, (s, &t)) in tokens.iter().zip(&types).enumerate() {
            if t == TOKEN_CONTROL && END_OF_GENERATION.contains(&s.as_str()) && !end_of_generation.contains(&(i as u32))
            {
                end_of_generation.push(i as u32);
            }
        }
        Ok(Self {
            model,
            add_eos: add_eos.unwrap_or(false),
            bytes,
            bos,
            eos,
            add_bos: add_bos.unwrap_or(false),
            end_of_generation,
            chat_template,
            tokens,
        })
    }

    /// Byte-level BPE through `tokenizers`, with llama.cpp's pre-tokenizer of that name.
    fn bpe(
        tokens: &[String],
        types: &[i32],
        merges: &[String],
        pre: Option<String>,
    ) -> Result<(Model, Vec<Vec<u8>>), TokenizerError> {
        // Byte-level BPE without merges would split every text into single bytes: refuse the file.
        if merges.is_empty() {
            return Err(err("no tokenizer.ggml.merges (byte-level BPE needs them)"));
        }
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("bad merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = pre.unwrap_or_else(|| "default".into());
        let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            let pattern = SplitPattern::Regex(re.into());
            Ok(PreTokenizerWrapper::Split(Split::new(pattern, SplitDelimiterBehavior::Isolated, false).map_err(err)?))
        };
        let pre_tokenizer = match pre.as_str() {
            // llama.cpp's SMOLLM: every digit on its own, then GPT-2's regex.
            "smollm" => Sequence::new(vec![split(r"\p{N}")?, ByteLevel::new(false, false, true).into()]),
            "gpt2" | "default" => Sequence::new(vec![ByteLevel::new(false, false, true).into()]),
            "llama3" | "llama-bpe" | "smaug-bpe" => {
                Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, false, false).into()])
            }
            "qwen2" | "deepseek-r1-qwen" => {
                Sequence::new(vec![split(QWEN2_REGEX)?, ByteLevel::new(false, false, false).into()])
            }
            other => return Err(err(format!("tokenizer.ggml.pre {other:?} is not supported yet"))),
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| **t == TOKEN_CONTROL || **t == TOKEN_USER_DEFINED)
            .map(|(s, t)| AddedToken::from(s.clone(), *t == TOKEN_CONTROL))
            .collect();
        tokenizer.add_special_tokens(&special);

        let decoder = byte_decoder();
        let bytes = tokens
            .iter()
            .zip(types)
            .map(|(s, &t)| match t {
                TOKEN_CONTROL => Vec::new(),
                TOKEN_USER_DEFINED => s.as_bytes().to_vec(),
                _ => s.chars().map(|c| decoder.get(&c).copied().unwrap_or(b'?')).collect(),
            })
            .collect();
        Ok((Model::Bpe(Box::new(tokenizer)), bytes))
    }

    /// Token ids of `text`, special tokens in it recognised, with BOS first when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.model {
            Model::Bpe(t) => {
                let enc = t.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Model::Spm(spm) => ids.extend(spm.encode(text)),
        }
        if self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Every token of `text` with its text (a control token: its name), BOS first when the model adds
    /// it and `add_special_tokens` asks for it; for the Tokenize RPC. A token that holds part of a UTF-8
    /// character shows it as U+FFFD.
    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<(u32, String)>, TokenizerError> {
        let mut ids = self.encode(text)?;
        if !add_special_tokens && self.add_bos && self.bos.is_some() && ids.first() == self.bos.as_ref() {
            ids.remove(0);
        }
        if !add_special_tokens && self.add_eos && self.eos.is_some() && ids.last() == self.eos.as_ref() {
            ids.pop();
        }
        Ok(ids
            .into_iter()
            .map(|id| {
                let bytes = self.token_bytes(id);
                let piece = if bytes.is_empty() {
                    self.token_text(id).unwrap_or_default().to_string()
                } else {
                    String::from_utf8_lossy(bytes).into_owned()
                };
                (id, piece)
            })
            .collect())
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// A token's bytes in generated text (empty for control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }
}

/// Turns a stream of token ids into text pieces that never split a UTF-8 character: bytes of an
/// incomplete character wait for the next token.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// The text completed by this token (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes (not merely incomplete): emit them as U+FFFD rather than wait forever.
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
        };
        let rest = self.pending.split_off(valid);
        String::from_utf8(std::mem::replace(&mut self.pending, rest)).expect("checked valid above")
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_are_never_split() {
        let mut d = Detokenizer::default();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(d.push(b"a"), "a");
        assert_eq!(d.push(&euro[..1]), "");
        assert_eq!(d.push(&euro[1..2]), "");
        assert_eq!(d.push(&[euro[2], b'b']), "€b");
        assert_eq!(d.push(&[0xFF]), "\u{FFFD}");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn the_byte_table_covers_every_byte_once() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'Ċ'], b'\n');
        assert_eq!(d[&'a'], b'a');
    }
}
