//! Starts the real `omnibus` binary on 127.0.0.1:0 with the real models and waits on its health service.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use omnibus::server::pb::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    assert!(
        dir.join("all-MiniLM-L6-v2").join("model.safetensors").exists(),
        "the default models are missing: run `python3 models/fetch.py` (the README's test command does)"
    );
    dir
}

pub type RawClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>;

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Starts `omnibus serve` with extra flags and waits until health reports SERVING.
    pub async fn start(extra: &[&str]) -> Server {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "omnibus-{}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let stderr = std::fs::File::create(&log).expect("create the server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_omnibus"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--model-dir"])
            .arg(model_dir())
            .args(extra)
            .env("OMNIBUS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn omnibus");
        let stdout = child.stdout.take().expect("stdout is piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .expect("read the listening line");
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("omnibus listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; server log: {}", log.display()))
            .parse()
            .expect("a socket address");
        let server = Server { child, addr, log };
        server.wait_serving().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect")
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await)
    }

    /// A client over plain hyper HTTP/2, without the client-side timer tonic's `Channel` runs for
    /// `grpc-timeout`: what a caller then sees at a deadline is what the server answered.
    pub fn client_without_timer(&self) -> InferenceClient<RawClient> {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
        InferenceClient::with_origin(client, self.url().parse().unwrap())
    }

    /// Follows grpc.health.v1.Health/Watch for the whole server until it says SERVING.
    async fn wait_serving(&self) {
        let mut health = HealthClient::new(self.channel().await);
        let mut stream =
            health.watch(HealthCheckRequest { service: String::new() }).await.expect("health watch").into_inner();
        let serving = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(msg) = stream.message().await.expect("health stream") {
                if msg.status == ServingStatus::Serving as i32 {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(serving, Ok(true), "server never became SERVING; log: {}", self.log.display());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
