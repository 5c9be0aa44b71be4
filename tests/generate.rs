//! Generate end to end: the real binary, the real SmolLM2 GGUF, a generated tonic client.
mod common;

use std::time::Duration;

use common::{LONG_PROMPT, Server};
use omnibus::server::pb::generate_response::Kind;
use omnibus::server::pb::{self, ChatMessage, GenerateRequest, SamplingParams};
use serde::Deserialize;
use tonic::{Code, Request};

#[derive(Deserialize, Clone)]
struct Case {
    prompt: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    text: String,
}

fn cases() -> Vec<Case> {
    #[derive(Deserialize)]
    struct R {
        cases: Vec<Case>,
    }
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generation.json")).unwrap();
    serde_json::from_str::<R>(&text).unwrap().cases
}

fn greedy(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest { prompt: prompt.into(), max_new_tokens: n, ..Default::default() }
}

/// Everything a finished stream said.
#[derive(Debug, Default)]
struct Collected {
    ids: Vec<u32>,
    text: String,
    indexes: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<pb::TokenLogprob>>,
    prompt: Option<pb::PromptLogprobs>,
    end: Option<pb::GenerateEnd>,
}

async fn collect(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Result<Collected, tonic::Status> {
    let mut c = Collected::default();
    while let Some(msg) = stream.message().await? {
        assert!(c.end.is_none(), "a message after the end");
        match msg.kind.expect("every message has a kind") {
            Kind::PromptLogprobs(p) => {
                assert!(c.ids.is_empty() && c.prompt.is_none(), "prompt log-probabilities come first, once");
                c.prompt = Some(p);
            }
            Kind::Token(t) => {
                c.ids.push(t.id);
                c.text.push_str(&t.text);
                c.indexes.push(t.index);
                c.logprobs.push(t.logprob);
                c.top.push(t.top_logprobs);
            }
            Kind::End(e) => c.end = Some(e),
        }
    }
    Ok(c)
}

#[tokio::test]
async fn greedy_streams_match_llama_cpp_and_end_once() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    for case in cases() {
        let stream = client.generate(greedy(&case.prompt, 24)).await.unwrap().into_inner();
        let c = collect(stream).await.unwrap();
        assert_eq!(c.ids, case.token_ids, "prompt {:?}", case.prompt);
        assert_eq!(c.text, case.text, "detokenized text of {:?}", case.prompt);
        assert_eq!(c.indexes, (0..24).collect::<Vec<_>>());
        let end = c.end.expect("exactly one end");
        assert_eq!(end.finish_reason, pb::FinishReason::Length as i32);
        let usage = end.usage.unwrap();
        assert_eq!(usage.prompt_tokens as usize, case.prompt_token_ids.len());
        assert_eq!(usage.completion_tokens, 24);
        let t = end.timings.unwrap();
        assert!(t.time_to_first_token_us > 0 && t.time_to_first_token_us <= t.total_time_us);
        assert_eq!(end.model, "SmolLM2-135M-Instruct.Q4_1");
    }
}

#[tokio::test]
async fn streams_that_join_a_running_batch_decode_as_they_would_alone() {
    let server = Server::start(&[]).await;
    let client = server.client().await;
    let cases = cases();
    // Case 0 starts; case 1 joins once case 0 has streamed 3 tokens, case 2 once case 1 has 5.
    let mut first = client.clone().generate(greedy(&cases[0].prompt, 24)).await.unwrap().into_inner();
    let mut head0 = Vec::new();
    while head0.len() < 3 {
        if let Some(Kind::Token(t)) = first.message().await.unwrap().unwrap().kind {
            head0.push(t.id);
        }
    }
    let mut second = client.clone().generate(greedy(&cases[1].prompt, 24)).await.unwrap().into_inner();
    let mut head1 = Vec::new();
    while head1.len() < 5 {
        if let Some(Kind::Token(t)) = second.message().await.unwrap().unwrap().kind {
            head1.push(t.id);
        }
    }
    let third = tokio::spawn({
        let mut c = client.clone();
        let p = cases[2].prompt.clone();
        async move { collect(c.generate(greedy(&p, 24)).await.unwrap().into_inner()).await.unwrap() }
    });
    let (rest0, rest1) = tokio::join!(collect(first), collect(second));
    let mut ids0 = head0;
    ids0.extend(rest0.unwrap().ids);
    let mut ids1 = head1;
    ids1.extend(rest1.unwrap().ids);
    assert_eq!(ids0, cases[0].token_ids);
    assert_eq!(ids1, cases[1].token_ids);
    assert_eq!(third.await.unwrap().ids, cases[2].token_ids);
}

#[tokio::test]
async fn seeded_sampling_repeats_and_logprobs_are_reported() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let sampled = |seed: u64| GenerateRequest {
        prompt: "Once upon a time".into(),
        max_new_tokens: 16,
        sampling: Some(SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: Some(0.95),
            seed: Some(seed),
            ..Default::default()
        }),
        logprobs: true,
        ..Default::default()
    };
    let a = collect(client.generate(sampled(7)).await.unwrap().into_inner()).await.unwrap();
    let b = collect(client.generate(sampled(7)).await.unwrap().into_inner()).await.unwrap();
    let c = collect(client.generate(sampled(8)).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(a.ids, b.ids, "the same seed gives the same tokens");
    assert_ne!(a.ids, c.ids, "another seed gives other tokens");
    assert!(a.logprobs.iter().all(|&l| l < 0.0 && l.is_finite()), "{:?}", a.logprobs);
}

#[tokio::test]
async fn stop_sequences_end_the_stream_and_are_not_sent() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let case = &cases()[0]; // " is designed to be used as a text editor. ..."
    let mut req = greedy(&case.prompt, 24);
    req.stop = vec!["text editor".into(), "never appears".into()];
    let c = collect(client.generate(req).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(c.text, " is designed to be used as a ");
    let end = c.end.unwrap();
    assert_eq!(end.finish_reason, pb::FinishReason::StopSequence as i32);
    assert_eq!(end.stop_sequence, "text editor");
}

#[tokio::test]
async fn chat_messages_are_rendered_with_the_models_template() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let req = GenerateRequest {
        messages: vec![ChatMessage { role: "user".into(), content: "Say hello.".into() }],
        max_new_tokens: 40,
        ..Default::default()
    };
    let c = collect(client.generate(req).await.unwrap().into_inner()).await.unwrap();
    let end = c.end.unwrap();
    // The template adds SmolLM's system prompt and the role markers around the 3-token content.
    assert!(end.usage.unwrap().prompt_tokens > 20);
    assert!(!c.text.trim().is_empty());
    assert!(!c.text.contains("<|im_end|>"), "control tokens are not sent as text: {:?}", c.text);
}

async fn running(server: &Server) -> u32 {
    let models = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    models.iter().find(|m| m.kind == pb::ModelKind::Generation as i32).unwrap().load.unwrap().running
}

async fn wait_until_idle(server: &Server) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while running(server).await != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the running count never returned to zero");
}

#[tokio::test]
async fn a_client_that_hangs_up_frees_its_sequence() {
    hang_up_frees_its_sequence(&Server::start(&[]).await).await;
}

/// A stream that has sent two tokens is dropped: the server's running sequences go back to none.
async fn hang_up_frees_its_sequence(server: &Server) {
    let mut client = server.client().await;
    let mut stream = client.generate(greedy(LONG_PROMPT, 2000)).await.unwrap().into_inner();
    for _ in 0..2 {
        stream.message().await.unwrap().unwrap();
    }
    assert_eq!(running(server).await, 1);
    drop(stream);
    wait_until_idle(server).await;
}

#[tokio::test]
async fn a_deadline_mid_stream_ends_it_with_deadline_exceeded() {
    let server = Server::start(&[]).await;
    let mut client = server.client_without_timer();
    let mut req = Request::new(greedy(LONG_PROMPT, 2000));
    req.set_timeout(Duration::from_millis(1500));
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut tokens = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => tokens += 1,
            Ok(None) => panic!("the stream ended normally after {tokens} tokens"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(tokens > 0 && tokens < 2000, "{tokens} tokens before the deadline");
    wait_until_idle(&server).await;
}

#[tokio::test]
async fn a_full_waiting_room_answers_resource_exhausted() {
    let server = Server::start(&["--max-running-seqs", "1", "--max-waiting", "1"]).await;
    let client = server.client().await;
    let mut running_stream = client.clone().generate(greedy(LONG_PROMPT, 2000)).await.unwrap().into_inner();
    running_stream.message().await.unwrap().unwrap();
    let _waiting = client.clone().generate(greedy("Waiting", 10)).await.unwrap().into_inner();
    let status = client.clone().generate(greedy("One too many", 10)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("overloaded"));
}

fn assert_invalid(
    result: Result<tonic::Response<tonic::Streaming<pb::GenerateResponse>>, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "{:?} does not mention {n:?}", status.message());
    }
}

#[tokio::test]
async fn bad_generate_requests_get_precise_statuses() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let ok = greedy("Hello", 4);
    let with = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        r
    };
    let user = ChatMessage { role: "user".into(), content: "hi".into() };
    assert_invalid(
        client.generate(with(&|r| r.prompt.clear())).await,
        Code::InvalidArgument,
        &["prompt, messages", "neither"],
    );
    let both = with(&|r| r.messages = vec![user.clone()]);
    assert_invalid(client.generate(both).await, Code::InvalidArgument, &["prompt, messages", "both"]);
    assert_invalid(
        client.generate(with(&|r| r.max_new_tokens = 0)).await,
        Code::InvalidArgument,
        &["max_new_tokens", "got 0"],
    );
    assert_invalid(
        client.generate(with(&|r| r.max_new_tokens = 100_000)).await,
        Code::InvalidArgument,
        &["max_new_tokens", "2048", "100000"],
    );
    let long = "word ".repeat(7000);
    assert_invalid(
        client
            .generate(with(&|r| {
                r.prompt = long.clone();
                r.max_new_tokens = 2000
            }))
            .await,
        Code::InvalidArgument,
        &["max_new_tokens", "8192", "2000"],
    );
    let sampling = |s: SamplingParams| with(&move |r| r.sampling = Some(s));
    assert_invalid(
        client.generate(sampling(SamplingParams { temperature: -0.5, ..Default::default() })).await,
        Code::InvalidArgument,
        &["sampling.temperature", "-0.5"],
    );
    assert_invalid(
        client.generate(sampling(SamplingParams { temperature: f32::NAN, ..Default::default() })).await,
        Code::InvalidArgument,
        &["sampling.temperature", "NaN"],
    );
    for bad in [0.0, 1.5] {
        assert_invalid(
            client.generate(sampling(SamplingParams { top_p: Some(bad), ..Default::default() })).await,
            Code::InvalidArgument,
            &["sampling.top_p", "(0, 1]", &bad.to_string()],
        );
    }
    let role = with(&|r| {
        r.prompt.clear();
        r.messages = vec![ChatMessage { role: "wizard".into(), content: "hi".into() }]
    });
    assert_invalid(client.generate(role).await, Code::InvalidArgument, &["messages[0].role", "wizard"]);
    assert_invalid(client.generate(with(&|r| r.model = "nope".into())).await, Code::NotFound, &["nope", "SmolLM2"]);
    // And the server still generates.
    let c = collect(client.generate(ok.clone()).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(c.ids.len(), 4);
}

#[tokio::test]
async fn prompt_logprobs_score_the_prompt_exactly_as_generation_saw_it() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let prompt = "The quick brown fox jumps over the lazy";
    // Greedy, one token, with its log-probability and the 5 best alternatives.
    let req = GenerateRequest { logprobs: true, top_logprobs: 5, ..greedy(prompt, 1) };
    let first = collect(client.generate(req).await.unwrap().into_inner()).await.unwrap();
    assert!(first.prompt.is_none(), "no prompt log-probabilities unless asked");
    let (token, lp, top) = (first.ids[0], first.logprobs[0], &first.top[0]);
    assert_eq!(top.len(), 5);
    assert_eq!((top[0].id, top[0].logprob), (token, lp), "greedy takes the best, with the same log-probability");
    assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob), "best first: {top:?}");
    // Now score the prompt followed by that token: the last position is the token generation picked,
    // and its log-probability is the same bits (one order of sums, whatever the rows beside it).
    let ids = client
        .tokenize(pb::TokenizeRequest { text: format!("{prompt}{}", first.text), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let req = GenerateRequest { prompt_logprobs: 3, ..greedy(&format!("{prompt}{}", first.text), 1) };
    let scored = collect(client.generate(req).await.unwrap().into_inner()).await.unwrap();
    let positions = scored.prompt.expect("the stream begins with the prompt's log-probabilities").positions;
    assert_eq!(positions.len(), ids.len() - 1, "every prompt token after the first");
    assert_eq!(positions.iter().map(|p| p.id).collect::<Vec<_>>(), ids[1..].to_vec());
    for p in &positions {
        assert_eq!(p.top.len(), 3);
        assert!(p.logprob <= 0.0 && p.top[0].logprob >= p.logprob, "{p:?}");
        if let Some(alt) = p.top.iter().find(|t| t.id == p.id) {
            assert_eq!(alt.logprob, p.logprob, "a token's own log-probability and its place in the top agree");
        }
    }
    let last = positions.last().unwrap();
    assert_eq!((last.id, last.logprob), (token, lp), "scored == generated, to the bit");
    assert_eq!(scored.end.unwrap().usage.unwrap().prompt_tokens as usize, ids.len());
    // Bounds are checked like every other field.
    let err = client.generate(GenerateRequest { prompt_logprobs: 21, ..greedy(prompt, 1) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("prompt_logprobs") && err.message().contains("21"), "{}", err.message());
}

#[tokio::test]
async fn tokenize_counts_and_aligns_tokens_for_both_model_kinds() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let text = "Tokenizers split text; omnibus counts it.";
    // The default model: the generation model's byte-level BPE, whose pieces give the text back.
    let bpe = client.tokenize(pb::TokenizeRequest { text: text.into(), ..Default::default() }).await.unwrap();
    let bpe = bpe.into_inner();
    assert_eq!(bpe.ids.len(), bpe.pieces.len());
    assert_eq!(bpe.pieces.concat(), text);
    let mut generated = client.generate(GenerateRequest { prompt_logprobs: 1, ..greedy(text, 1) }).await.unwrap();
    let first = generated.get_mut().message().await.unwrap().unwrap();
    let Some(Kind::PromptLogprobs(p)) = first.kind else { panic!("prompt log-probabilities first") };
    assert_eq!(p.positions.len() + 1, bpe.ids.len(), "Tokenize counts what Generate reads");
    // The embedding model: [CLS] ... [SEP] with add_special_tokens, pieces aligned with the text.
    let req = pb::TokenizeRequest { model: "all-MiniLM-L6-v2".into(), text: text.into(), add_special_tokens: true };
    let enc = client.tokenize(req).await.unwrap().into_inner();
    assert_eq!(
        (enc.pieces.first().map(String::as_str), enc.pieces.last().map(String::as_str)),
        (Some("[CLS]"), Some("[SEP]"))
    );
    assert!(text.to_lowercase().starts_with(&enc.pieces[1].to_lowercase()), "{:?}", enc.pieces);
    let bare = pb::TokenizeRequest { model: "all-MiniLM-L6-v2".into(), text: text.into(), add_special_tokens: false };
    let bare = client.tokenize(bare).await.unwrap().into_inner();
    assert_eq!(bare.ids[..], enc.ids[1..enc.ids.len() - 1]);
    // Bounded like every input, and an unknown model is NOT_FOUND.
    let huge = pb::TokenizeRequest { text: "word ".repeat(200_000), ..Default::default() };
    let err = client.tokenize(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("text: 1000000 bytes"), "{}", err.message());
    let err = client.tokenize(pb::TokenizeRequest { model: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Gemma 3 270M Q4_K_M (an optional model, `fetch.py --with gemma3`) served end to end: its SentencePiece
/// tokenizer, sliding-window layers, a 262k-token head. (It is the pretrained 270M: asked a question in
/// turn markers it repeats the question, as llama.cpp's greedy run does too; a completion it gets right.)
#[tokio::test]
async fn gemma3_is_served_from_its_gguf_alone() {
    let dir = common::model_dir().join("optional");
    assert!(dir.join("gemma-3-270m-q4_k_m.gguf").exists(), "python3 models/fetch.py --with gemma3");
    let server = Server::start_in(&dir, &[]).await;
    let mut client = server.client().await;
    let prompt = "The capital of France is Paris. The capital of Germany is";
    let c = collect(client.generate(greedy(prompt, 12)).await.unwrap().into_inner()).await.unwrap();
    let end = c.end.expect("an end");
    assert_eq!(end.model, "gemma-3-270m-q4_k_m");
    assert!(!c.ids.is_empty() && c.ids.len() <= 12);
    assert!(c.text.starts_with(" Berlin"), "greedy answer {:?}", c.text);
    // The same prompt again in a batch of three gives the same tokens (batch invariance, served).
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                collect(client.generate(greedy(prompt, 12)).await.unwrap().into_inner()).await.unwrap().ids
            })
        })
        .collect();
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await.unwrap());
    }
    assert!(runs.iter().all(|r| *r == c.ids), "{runs:?} vs {:?}", c.ids);
    // Tokenize: BOS first with special tokens, and the pieces give the text back.
    let text = "Gemma's tokenizer: SentencePiece, bytes for the rest — ok? 日本語も。";
    let req = pb::TokenizeRequest { text: text.into(), add_special_tokens: true, ..Default::default() };
    let t = client.tokenize(req).await.unwrap().into_inner();
    assert_eq!(t.ids[0], 2, "Gemma's BOS");
    assert_eq!(t.pieces[1..].concat(), text);
    let usage = end.usage.unwrap();
    let req = pb::TokenizeRequest { text: prompt.into(), add_special_tokens: true, ..Default::default() };
    assert_eq!(usage.prompt_tokens as usize, client.tokenize(req).await.unwrap().into_inner().ids.len());
}

/// The device-generic decoder (candle's ops, what GPUs run), through the real server on candle's CPU
/// backend: streams that run beside others decode the same tokens as alone, and a client that hangs up
/// frees its sequence. Its tokens are held to llama.cpp by the fidelity contract (tests/fidelity.rs),
/// not token for token.
#[tokio::test]
async fn device_generic_streams_decode_in_a_batch_as_alone_and_hang_ups_free_them() {
    let server = Server::start_env(&[], &[("OMNIBUS_ENGINE", "device-generic")]).await;
    let mut client = server.client().await;
    let cases = cases();
    let mut alone = Vec::new();
    for case in &cases {
        let c = collect(client.generate(greedy(&case.prompt, 16)).await.unwrap().into_inner()).await.unwrap();
        assert_eq!(c.ids.len(), 16, "{:?}", case.prompt);
        alone.push(c.ids);
    }
    // The same prompts at once, each joining a little later than the one before.
    let mut tasks = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut c = client.clone();
        let p = case.prompt.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            collect(c.generate(greedy(&p, 16)).await.unwrap().into_inner()).await.unwrap().ids
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), alone[i], "{:?} decoded differently beside others", cases[i].prompt);
    }
    hang_up_frees_its_sequence(&server).await;
}
