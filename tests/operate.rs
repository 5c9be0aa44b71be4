//! Operating under load and in a mesh, end to end with the real binary and models: overload with
//! RetryInfo, deadlines that never reach the model, graceful drain on SIGTERM, metrics, request ids,
//! message size limits, TLS and mutual TLS.
mod common;

use std::time::Duration;

use common::{LONG_PROMPT, Server, sample};
use omnibus::server::pb::generate_response::Kind;
use omnibus::server::pb::{self, GenerateRequest, PredictRequest};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const EMBEDDER: &str = "all-MiniLM-L6-v2";
const GENERATOR: &str = "SmolLM2-135M-Instruct.Q4_1";

fn greedy(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest { prompt: prompt.into(), max_new_tokens: n, ..Default::default() }
}

fn predict(text: &str) -> PredictRequest {
    PredictRequest { inputs: vec![text.into()], ..Default::default() }
}

/// Reads a stream to its end: (tokens, the end message, or the status it failed with).
async fn drain(
    mut stream: tonic::Streaming<pb::GenerateResponse>,
) -> (usize, Result<Option<pb::GenerateEnd>, tonic::Status>) {
    let mut tokens = 0;
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.kind.unwrap() {
                Kind::PromptLogprobs(_) => {}
                Kind::Token(_) => tokens += 1,
                Kind::End(e) => {
                    assert!(stream.message().await.unwrap().is_none(), "nothing after the end");
                    return (tokens, Ok(Some(e)));
                }
            },
            Ok(None) => return (tokens, Ok(None)),
            Err(s) => return (tokens, Err(s)),
        }
    }
}

/// Every generated token reached the client: `streamed` token messages, plus the end-of-sequence token
/// (counted, never sent) when the model stopped on its own.
fn assert_complete(end: pb::GenerateEnd, streamed: usize) {
    let eos = end.finish_reason == pb::FinishReason::EndOfSequence as i32;
    assert_eq!(end.usage.unwrap().completion_tokens as usize, streamed + eos as usize, "{end:?}");
}

#[tokio::test]
async fn overload_is_refused_with_retry_info_while_admitted_calls_succeed() {
    let server = Server::start(&["--max-running-seqs", "1", "--max-waiting", "1"]).await;
    let client = server.client().await;
    let mut running = client.clone().generate(greedy("Count to a hundred:", 40)).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    let waiting = client.clone().generate(greedy("Then this one", 8)).await.unwrap().into_inner();
    // A third has no room: refused at once, with a retry delay, and the message says why.
    let refused = client.clone().generate(greedy("One too many", 8)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("overloaded"), "{}", refused.message());
    let delay = omnibus::server::retry_delay(&refused).expect("a google.rpc.RetryInfo detail");
    assert!(delay >= Duration::from_millis(10) && delay <= Duration::from_secs(10), "{delay:?}");
    // Predict shares nothing with the generation queue and still answers.
    client.clone().predict(predict("still served")).await.unwrap();
    // Both admitted streams finish normally.
    let (n, end) = drain(running).await;
    assert_complete(end.unwrap().expect("an end message"), n + 1);
    let (n, end) = drain(waiting).await;
    assert_complete(end.unwrap().expect("an end message"), n);
    let m = server.scrape().await;
    let refused = format!(
        "omnibus_request_failures_total{{model=\"{GENERATOR}\",version=\"1\",method=\"Generate\",code=\"RESOURCE_EXHAUSTED\",reason=\"queue_full\"}}"
    );
    assert_eq!(sample(&m, &refused), 1.0, "{m}");
}

#[tokio::test]
async fn an_expired_deadline_never_reaches_the_model() {
    let server = Server::start(&["--max-running-seqs", "1"]).await;
    let client = server.client().await;
    let expired = format!("omnibus_expired_before_model_total{{model=\"{GENERATOR}\"}}");
    let prompt_tokens = format!("omnibus_prompt_tokens_total{{model=\"{GENERATOR}\"}}");
    let before = server.scrape().await;
    // The running sequence must outlive the queued call's 300 ms: "Tell me a long story about" ended at
    // its 23rd token, ~100 ms in on an AVX-512 Xeon, and the queued call ran. Greedy counting goes on to
    // max_new_tokens (255 tokens and the end, on every SIMD path).
    let mut running = client.clone().generate(greedy("1, 2, 3,", 256)).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    // Queued behind the running sequence with 300 ms to live: it expires while waiting.
    let mut raw = server.client_without_timer();
    let mut req = Request::new(greedy("Too late", 8));
    req.set_timeout(Duration::from_millis(300));
    let (n, result) = drain(raw.generate(req).await.unwrap().into_inner()).await;
    let status = result.unwrap_err();
    assert_eq!((n, status.code()), (0, Code::DeadlineExceeded), "{status:?}");
    drain(running).await.1.unwrap();
    let after = server.scrape().await;
    assert_eq!(sample(&after, &expired) - sample(&before, &expired), 1.0, "{after}");
    // Only the running sequence's prompt was read by the model.
    let read = sample(&after, &prompt_tokens) - sample(&before, &prompt_tokens);
    assert!(read > 0.0 && read < 12.0, "{read} prompt tokens counted");
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_refuses_new_calls_and_exits_zero() {
    let mut server = Server::start(&[]).await;
    let client = server.client().await;
    let mut stream = client.clone().generate(greedy("Write a poem about the sea", 48)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    server.terminate();
    // Health turns NOT_SERVING and new calls are refused with UNAVAILABLE while the stream runs on.
    let mut health = HealthClient::new(server.channel().await);
    let mut refused = None;
    for _ in 0..100 {
        let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
        if status == ServingStatus::NotServing as i32 {
            refused = Some(client.clone().predict(predict("new call")).await.unwrap_err());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("health never turned NOT_SERVING");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{}", refused.message());
    let (n, end) = drain(stream).await;
    assert_complete(end.unwrap().expect("the stream ends normally"), n + 1);
    let status = server.wait_exit(Duration::from_secs(20)).await.expect("the process exits after the drain");
    assert!(status.success(), "{status:?}; log: {}", server.log.display());
}

#[tokio::test]
async fn after_the_grace_period_what_remains_ends_with_unavailable() {
    let mut server = Server::start(&["--shutdown-grace", "300ms"]).await;
    let client = server.client().await;
    let mut stream = client.clone().generate(greedy(LONG_PROMPT, 2000)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    server.terminate();
    let (n, result) = drain(stream).await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("grace period"), "{}", status.message());
    assert!(n < 1999, "{n} tokens");
    let exit = server.wait_exit(Duration::from_secs(20)).await.expect("the process exits");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn metrics_exist_move_and_calls_carry_request_ids() {
    let server = Server::start(&[]).await;
    let before = server.scrape().await;
    for name in omnibus::metrics::names() {
        assert!(before.contains(&format!("# TYPE {name} ")), "{name} missing from\n{before}");
    }
    assert!(before.contains(&format!("omnibus_queue_size{{model=\"{EMBEDDER}\"}} 0")), "{before}");
    assert!(before.contains(&format!("omnibus_queue_size{{model=\"{GENERATOR}\"}} 0")), "{before}");
    let mut client = server.client().await;
    let mut req = Request::new(predict("metrics should move"));
    req.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    let res = client.predict(req).await.unwrap();
    assert_eq!(res.metadata().get("x-request-id").unwrap(), "req-42");
    assert!(res.metadata().get("x-omnibus-queue-time-us").is_some());
    let res = client.predict(predict("no id given")).await.unwrap();
    assert_eq!(res.metadata().get("x-request-id").unwrap().len(), 32, "a generated id");
    let (n, end) = drain(client.generate(greedy("Hello", 5)).await.unwrap().into_inner()).await;
    assert_eq!((n, end.unwrap().is_some()), (5, true));
    let after = server.scrape().await;
    let ok = format!("omnibus_requests_total{{model=\"{EMBEDDER}\",version=\"1\",method=\"Predict\",code=\"OK\"}}");
    assert_eq!(sample(&after, &ok) - sample(&before, &ok), 2.0, "{after}");
    let gen_ok =
        format!("omnibus_requests_total{{model=\"{GENERATOR}\",version=\"1\",method=\"Generate\",code=\"OK\"}}");
    assert_eq!(sample(&after, &gen_ok), 1.0, "{after}");
    assert_eq!(sample(&after, &format!("omnibus_generated_tokens_total{{model=\"{GENERATOR}\"}}")), 5.0);
    let ttft = format!("omnibus_time_to_first_token_seconds_count{{model=\"{GENERATOR}\"}}");
    assert_eq!(sample(&after, &ttft), 1.0, "{after}");
    let batches = format!("omnibus_batch_size_count{{model=\"{EMBEDDER}\"}}");
    assert!(sample(&after, &batches) >= 2.0, "{after}");
}

#[tokio::test]
async fn an_oversized_message_is_refused_with_its_own_message() {
    let server = Server::start(&["--max-message-size", "4096"]).await;
    let mut client = server.client().await;
    let big = PredictRequest { inputs: vec!["word ".repeat(400); 4], truncate: true, ..Default::default() };
    let status = client.predict(big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too large") && status.message().contains("--max-message-size"), "{status:?}");
    assert!(!status.message().contains("overloaded"));
    assert!(omnibus::server::retry_delay(&status).is_none(), "retrying the same message cannot help");
    client.predict(predict("a small one passes")).await.unwrap();
}

mod tls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    use super::*;

    struct Pki {
        dir: std::path::PathBuf,
        ca_pem: String,
        client: Identity,
    }

    fn pki() -> Pki {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into()]);
        let (client_cert, client_key) = leaf(vec!["client.omnibus.test".into()]);
        std::fs::write(dir.join("server.pem"), server_cert).unwrap();
        std::fs::write(dir.join("server.key"), server_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca_pem: ca.pem(), client: Identity::from_pem(client_cert, client_key) }
    }

    fn flags(p: &Pki, mtls: bool) -> Vec<String> {
        let mut f = vec![
            "--tls-cert".to_string(),
            p.dir.join("server.pem").display().to_string(),
            "--tls-key".into(),
            p.dir.join("server.key").display().to_string(),
        ];
        if mtls {
            f.extend(["--tls-client-ca".to_string(), p.dir.join("ca.pem").display().to_string()]);
        }
        f
    }

    fn client_tls(p: &Pki, with_cert: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&p.ca_pem)).domain_name("localhost");
        if with_cert { tls.identity(p.client.clone()) } else { tls }
    }

    #[tokio::test]
    async fn tls_serves_and_plaintext_is_refused() {
        let p = pki();
        let f = flags(&p, false);
        let server =
            Server::start_tls(&f.iter().map(String::as_str).collect::<Vec<_>>(), Some(client_tls(&p, false))).await;
        let mut client = server.client().await;
        let out = client.predict(predict("over TLS")).await.unwrap().into_inner();
        assert_eq!(out.outputs[0].values.len(), 384);
        let plain = tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await;
        let refused = match plain {
            Err(_) => true,
            Ok(ch) => pb::inference_client::InferenceClient::new(ch).predict(predict("plaintext")).await.is_err(),
        };
        assert!(refused, "a plaintext call to a TLS server must fail");
    }

    #[tokio::test]
    async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
        let p = pki();
        let f = flags(&p, true);
        let server =
            Server::start_tls(&f.iter().map(String::as_str).collect::<Vec<_>>(), Some(client_tls(&p, true))).await;
        server.client().await.predict(predict("with a client certificate")).await.unwrap();
        let anonymous = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .tls_config(client_tls(&p, false))
            .unwrap()
            .connect()
            .await;
        let refused = match anonymous {
            Err(_) => true,
            Ok(ch) => pb::inference_client::InferenceClient::new(ch).predict(predict("no certificate")).await.is_err(),
        };
        assert!(refused, "a client without a certificate must be refused");
    }
}

/// `--place` naming a model the directory does not hold stops the start with a message naming it and
/// the models there; a malformed value is refused by the flag parser, naming the value.
#[test]
fn a_placement_of_an_unknown_model_is_refused_at_start() {
    let run = |place: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_omnibus"))
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--place", place])
            .arg("--model-dir")
            .arg(common::model_dir())
            .output()
            .expect("run omnibus")
    };
    let out = run("nope=0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--place nope: no such model in the model directory (it holds: "), "{err}");
    let out = run("all-MiniLM-L6-v2=first");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("\"first\" is not a GPU index"), "{err}");
}
