//! `omnibus compare`: scores the same texts on two running servers through the public API (Generate with
//! `prompt_logprobs`, teacher-forced) and reports how far their next-token distributions are apart, by
//! llama.cpp's yardstick as far as an API can carry it: the reference's top-k ids plus one bucket for the
//! rest. It is how `scripts/gpu-check` compares a GPU with the same machine's CPU path.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::server::pb::generate_response::Kind;
use crate::server::pb::{GenerateRequest, TokenLogprobs, inference_client::InferenceClient};

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The server under test.
    #[arg(long)]
    pub addr: String,
    /// The reference server (the same model file).
    #[arg(long)]
    pub reference: String,
    /// Model name on both (empty: each server's default).
    #[arg(long, default_value = "")]
    pub model: String,
    /// A file of texts to score, one per line (blank lines skipped).
    #[arg(long)]
    pub text_file: PathBuf,
    /// Alternatives per position (at most 20, the API's bound).
    #[arg(long, default_value_t = 20)]
    pub top: u32,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// How far the server under test is from the reference, over every scored position.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Agreement {
    pub positions: usize,
    /// KL(reference || test) over the reference's top ids plus the rest. An id missing from the test's
    /// own top list is given the test's smallest listed log-probability (an upper bound on its true value).
    pub mean_kld: f64,
    pub max_kld: f64,
    /// Positions where both put the same id first.
    pub same_top: f64,
    /// |difference| of the log-probability of the text's actual next token, which both report exactly.
    pub mean_abs_dlogprob: f64,
    pub max_abs_dlogprob: f64,
}

fn rest_of(lp: &[f64]) -> f64 {
    (1.0 - lp.iter().map(|v| v.exp()).sum::<f64>()).max(1e-30).ln()
}

/// Compares one text's positions (reference first), pushing onto the running sums.
pub fn agreement(pairs: &[(&TokenLogprobs, &TokenLogprobs)]) -> Agreement {
    let mut a = Agreement::default();
    let (mut kld_sum, mut d_sum, mut same) = (0.0, 0.0, 0usize);
    for (r, t) in pairs {
        let p: Vec<f64> = r.top.iter().map(|x| x.logprob as f64).collect();
        let floor = t.top.iter().map(|x| x.logprob as f64).fold(f64::INFINITY, f64::min);
        let q: Vec<f64> =
            r.top.iter().map(|x| t.top.iter().find(|y| y.id == x.id).map_or(floor, |y| y.logprob as f64)).collect();
        let mut kl: f64 = p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum();
        let rest = rest_of(&p);
        kl += rest.exp() * (rest - rest_of(&q));
        kld_sum += kl;
        a.max_kld = a.max_kld.max(kl);
        same += (r.top.first().map(|x| x.id) == t.top.first().map(|x| x.id)) as usize;
        let d = (r.logprob as f64 - t.logprob as f64).abs();
        d_sum += d;
        a.max_abs_dlogprob = a.max_abs_dlogprob.max(d);
    }
    let n = pairs.len().max(1) as f64;
    a.positions = pairs.len();
    a.mean_kld = kld_sum / n;
    a.same_top = same as f64 / n;
    a.mean_abs_dlogprob = d_sum / n;
    a
}

async fn score(addr: &str, model: &str, text: &str, top: u32) -> anyhow::Result<Vec<TokenLogprobs>> {
    let channel =
        Endpoint::from_shared(addr.to_string())?.connect().await.with_context(|| format!("connect {addr}"))?;
    let mut client = InferenceClient::new(channel).max_decoding_message_size(64 << 20);
    let req = GenerateRequest {
        model: model.to_string(),
        prompt: text.to_string(),
        max_new_tokens: 1,
        prompt_logprobs: top,
        ..Default::default()
    };
    let mut stream = client.generate(req).await.with_context(|| format!("Generate on {addr}"))?.into_inner();
    while let Some(msg) = stream.message().await? {
        if let Some(Kind::PromptLogprobs(p)) = msg.kind {
            return Ok(p.positions);
        }
    }
    anyhow::bail!("{addr} sent no prompt log-probabilities")
}

pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let texts = std::fs::read_to_string(&args.text_file).with_context(|| format!("{}", args.text_file.display()))?;
    let (mut refs, mut tests) = (Vec::new(), Vec::new());
    for text in texts.lines().filter(|l| !l.trim().is_empty()) {
        let r = score(&args.reference, &args.model, text, args.top).await?;
        let t = score(&args.addr, &args.model, text, args.top).await?;
        anyhow::ensure!(
            r.len() == t.len() && r.iter().zip(&t).all(|(a, b)| a.id == b.id),
            "the two servers tokenized {text:?} differently: are they serving the same file?"
        );
        refs.extend(r);
        tests.extend(t);
    }
    let pairs: Vec<_> = refs.iter().zip(&tests).collect();
    let a = agreement(&pairs);
    if args.json {
        println!("{}", serde_json::to_string(&a)?);
    } else {
        println!(
            "{} positions: mean KLD {:.6} (max {:.5}), same top {:.2}%, |dlogprob| of the text's tokens mean {:.5} max {:.4}",
            a.positions,
            a.mean_kld,
            a.max_kld,
            100.0 * a.same_top,
            a.mean_abs_dlogprob,
            a.max_abs_dlogprob
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::pb::TokenLogprob;

    fn pos(id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprobs {
        TokenLogprobs {
            id,
            text: String::new(),
            logprob,
            top: top.iter().map(|&(id, logprob)| TokenLogprob { id, text: String::new(), logprob }).collect(),
        }
    }

    #[test]
    fn identical_servers_agree_exactly_and_a_different_one_does_not() {
        let r = pos(5, -0.7, &[(5, -0.5), (6, -1.2), (7, -2.5)]);
        let same = agreement(&[(&r, &r)]);
        assert_eq!((same.mean_kld.abs() < 1e-12, same.same_top, same.max_abs_dlogprob), (true, 1.0, 0.0));
        // The test server ranks 6 first and has dropped 7 from its list.
        let t = pos(5, -1.1, &[(6, -0.4), (5, -1.1), (8, -3.0)]);
        let off = agreement(&[(&r, &t)]);
        assert_eq!(off.same_top, 0.0);
        assert!(off.mean_kld > 0.1, "{off:?}");
        assert!((off.max_abs_dlogprob - 0.4).abs() < 1e-6, "{off:?}");
    }
}
