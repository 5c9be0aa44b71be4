//! Hostile clients against the real binary: each probe runs beside a well-behaved call on the same
//! connection, which must still succeed. Oversized metadata, inputs of tens of megabytes, malformed
//! messages, stream deadlines, silent sockets and a reader that never reads.
mod common;

use std::time::{Duration, Instant};

use common::{LONG_PROMPT, Server, sample};
use omnibus::server::pb::{self, GenerateRequest, PredictRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

fn predict(inputs: &[&str]) -> PredictRequest {
    PredictRequest { inputs: inputs.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn generate(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest { prompt: prompt.into(), max_new_tokens: n, ..Default::default() }
}

/// Reads a stream to its end: (tokens, the end message's presence, the error that ended it).
async fn drain(mut s: tonic::Streaming<pb::GenerateResponse>) -> (usize, bool, Option<tonic::Status>) {
    let (mut tokens, mut end) = (0, false);
    loop {
        match s.message().await {
            Ok(Some(m)) => match m.kind {
                Some(pb::generate_response::Kind::Token(_)) => tokens += 1,
                Some(pb::generate_response::Kind::End(_)) => end = true,
                _ => {}
            },
            Ok(None) => return (tokens, end, None),
            Err(e) => return (tokens, end, Some(e)),
        }
    }
}

#[tokio::test]
async fn oversized_metadata_fails_alone_and_the_connection_lives() {
    let server = Server::start(&[]).await;
    let channel = server.channel().await;
    let mut client = pb::inference_client::InferenceClient::new(channel.clone());
    // Well-behaved calls on the same connection, running while the probes go by.
    let stream = client.generate(generate("Once upon a time", 150)).await.unwrap().into_inner();
    let long = tokio::spawn(drain(stream));
    let batch: Vec<String> = (0..32).map(|i| format!("sentence number {i} of a full batch")).collect();
    let mut c2 = client.clone();
    let predict32 = tokio::spawn(async move {
        c2.predict(PredictRequest { inputs: batch, ..Default::default() }).await.map(|r| r.into_inner().outputs.len())
    });

    // One 100 KB header: above the 96 KiB limit.
    let mut req = Request::new(predict(&["hello"]));
    req.metadata_mut().insert("x-big", MetadataValue::try_from("a".repeat(100_000)).unwrap());
    let status = client.predict(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-header-bytes of 98304"), "{}", status.message());
    // 200 headers of 200 bytes (46 KB as HTTP/2 counts it): under the limit, so it is served.
    let mut req = Request::new(predict(&["hello"]));
    for i in 0..200 {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            MetadataValue::try_from("b".repeat(200)).unwrap(),
        );
    }
    assert_eq!(client.predict(req).await.unwrap().into_inner().outputs.len(), 1);

    let (tokens, end, err) = long.await.unwrap();
    assert!(err.is_none() && end && tokens == 150, "the stream beside the probes: {tokens} tokens, {err:?}");
    assert_eq!(predict32.await.unwrap().unwrap(), 32);
    let scrape = server.scrape().await;
    let refused = sample(
        &scrape,
        r#"omnibus_request_failures_total{model="none",version="",method="Predict",code="RESOURCE_EXHAUSTED",reason="header_too_large"}"#,
    );
    assert_eq!(refused, 1.0, "the refused call is counted");
}

#[tokio::test]
async fn sixty_megabyte_inputs_are_answered_within_a_second() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let huge = "word ".repeat(12_000_000); // 60 MB
    // With truncation: embedded from the start of the text; only that much is tokenized.
    let mut req = predict(&[&huge]);
    req.truncate = true;
    let started = Instant::now();
    let resp = client.predict(req).await.unwrap().into_inner();
    assert_eq!(resp.metadata.unwrap().prompt_tokens, 256);
    assert!(started.elapsed() < Duration::from_secs(1), "truncated Predict took {:?}", started.elapsed());
    // Without: refused on its length in bytes, before tokenizing.
    let started = Instant::now();
    let status = client.predict(predict(&[&huge])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("inputs[0]: 60000000 bytes"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(1), "refusing took {:?}", started.elapsed());
    // A generation prompt of 60 MB: refused just as fast.
    let started = Instant::now();
    let status = client.generate(generate(&huge, 4)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("prompt: 60000000 bytes"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(1), "refusing took {:?}", started.elapsed());
    // The same text, a little over the window, is embedded the same as its prefix would be.
    let just_over = "word ".repeat(300);
    let mut a = predict(&[&just_over]);
    a.truncate = true;
    let mut b = predict(&[&"word ".repeat(254)]);
    b.truncate = true;
    let (a, b) = (client.predict(a).await.unwrap().into_inner(), client.predict(b).await.unwrap().into_inner());
    assert_eq!(a.outputs[0].values, b.outputs[0].values);
}

/// A gRPC frame (uncompressed) around `body`.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_and_counted() {
    use http_body_util::{BodyExt, Full};
    let server = Server::start(&[]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let cases: [(&str, &str, Vec<u8>); 4] = [
        ("invalid UTF-8 in a string", "Predict", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("a bad varint", "Predict", vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ("a truncated buffer", "Generate", vec![0x0a, 0x10, b'h', b'i']),
        ("a field of a wrong wire type", "ModelInfer", vec![0x0b]),
    ];
    for (what, method, body) in cases {
        let service = if method == "ModelInfer" { "inference.GRPCInferenceService" } else { "omnibus.v1.Inference" };
        let req = http::Request::post(format!("{}/{service}/{method}", server.url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from(frame(&body))))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let trailers = body.collect().await.unwrap().trailers().cloned();
        let headers = trailers.as_ref().filter(|t| t.contains_key("grpc-status")).unwrap_or(&parts.headers);
        let status = tonic::Status::from_header_map(headers).expect("a gRPC status");
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().starts_with("malformed message"), "{what}: {}", status.message());
    }
    let scrape = server.scrape().await;
    let count = |m: &str| {
        sample(
            &scrape,
            &format!(
                r#"omnibus_request_failures_total{{model="none",version="",method="{m}",code="INVALID_ARGUMENT",reason="malformed"}}"#
            ),
        )
    };
    assert_eq!((count("Predict"), count("Generate"), count("ModelInfer")), (2.0, 1.0, 1.0));
    // And the server is fine.
    assert_eq!(server.client().await.predict(predict(&["still here"])).await.unwrap().into_inner().outputs.len(), 1);
}

#[tokio::test]
async fn a_stream_ends_at_its_deadline_from_the_server() {
    let server = Server::start(&[]).await;
    let mut client = server.client_without_timer();
    // The connection first, so that the clock below starts when the call does, as a caller's timer would.
    client.predict(predict(&["connect"])).await.unwrap();
    let mut req = Request::new(generate(LONG_PROMPT, 2000));
    req.set_timeout(Duration::from_millis(700));
    let started = Instant::now();
    let stream = client.generate(req).await.unwrap().into_inner();
    let (tokens, end, err) = drain(stream).await;
    let err = err.expect("the stream must end with a status");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    assert!(!end && tokens > 0, "{tokens} tokens, end {end}");
    assert!(started.elapsed() < Duration::from_millis(700), "the server answered after the caller's deadline");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let scrape = server.scrape().await;
    let deadline = sample(
        &scrape,
        r#"omnibus_request_failures_total{model="SmolLM2-135M-Instruct.Q4_1",version="1",method="Generate",code="DEADLINE_EXCEEDED",reason="deadline"}"#,
    );
    assert_eq!(deadline, 1.0, "counted as a deadline");
    assert_eq!(sample(&scrape, "omnibus_inflight_calls"), 0.0);
}

/// Reads (and drops) whatever the server sends until it closes the socket: true if that happens
/// within `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let until_closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn silent_sockets_are_closed_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "3s"]).await;
    let mut client = server.client().await;
    assert_eq!(client.predict(predict(&["warm"])).await.unwrap().into_inner().outputs.len(), 1);
    let before = open_fds(server.pid());
    // 300 sockets: half say nothing at all, half send the HTTP/2 preface and stall.
    let mut socks = Vec::new();
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        }
        socks.push(s);
    }
    // The server accepts them as its runtime gets to it (slower beside other tests): wait for it, well
    // within the handshake timeout.
    let accepting = Instant::now();
    while open_fds(server.pid()) < before + 250 && accepting.elapsed() < Duration::from_millis(2000) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open_fds(server.pid()) >= before + 250, "the server did not hold the sockets at first");
    // The well-behaved client is served meanwhile.
    assert_eq!(client.predict(predict(&["beside 300 silent sockets"])).await.unwrap().into_inner().outputs.len(), 1);
    let started = Instant::now();
    for mut s in socks {
        // The server closes: EOF (or a reset) after whatever SETTINGS it had sent.
        let closed = closed_within(&mut s, Duration::from_secs(8)).await;
        assert!(closed, "a silent socket was still open {:?} after the timeout", started.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(open_fds(server.pid()) <= before + 5, "{} descriptors, {} before", open_fds(server.pid()), before);
    assert_eq!(client.predict(predict(&["after"])).await.unwrap().into_inner().outputs.len(), 1);
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_clients_reconnect() {
    let server = Server::start(&["--idle-timeout", "1s", "--keepalive-interval", "0"]).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let started = Instant::now();
    let closed = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // A tonic channel idle past the timeout reconnects on its next call.
    let mut client = server.client().await;
    client.predict(predict(&["first"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.predict(predict(&["after the idle timeout"])).await.unwrap();
}

#[tokio::test]
async fn a_reader_that_never_reads_is_released_at_its_deadline() {
    // A raw HTTP/2 client whose window is zero: the server can send nothing.
    let server = Server::start(&[]).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut h2c, conn) =
        h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = prost::Message::encode_to_vec(&generate(LONG_PROMPT, 500));
    let req = http::Request::post("/omnibus.v1.Inference/Generate")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "1000m")
        .body(())
        .unwrap();
    let (resp, mut send) = h2c.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from(frame(&body)), true).unwrap();
    let _resp = resp.await.unwrap(); // headers only: no window for data
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sample(&server.scrape().await, "omnibus_inflight_calls"), 1.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scrape = server.scrape().await;
    assert_eq!(sample(&scrape, "omnibus_inflight_calls"), 0.0, "the stalled call still counts as in flight");
    let deadline = sample(
        &scrape,
        r#"omnibus_request_failures_total{model="SmolLM2-135M-Instruct.Q4_1",version="1",method="Generate",code="DEADLINE_EXCEEDED",reason="deadline"}"#,
    );
    assert_eq!(deadline, 1.0);
    let running = sample(&scrape, r#"omnibus_running_sequences{model="SmolLM2-135M-Instruct.Q4_1"}"#);
    assert_eq!(running, 0.0, "its sequence still runs");
    // The rest of the server does not care.
    assert_eq!(server.client().await.predict(predict(&["fine"])).await.unwrap().into_inner().outputs.len(), 1);
}
