//! Starts the real `omnibus` binary on 127.0.0.1:0 with the real models and waits on its health service.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use omnibus::server::pb::inference_client::InferenceClient;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A prompt whose greedy continuation runs long (SmolLM2 counts on past 400 tokens), for tests that need
/// a stream still running when they act: a story prompt used before ended after 15 tokens once the
/// kernels' float order changed, and its EOS ended the test's stream early.
pub const LONG_PROMPT: &str = "Count from 1 to 1000, separated by commas: 1, 2, 3,";

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
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
    tls: Option<ClientTlsConfig>,
}

impl Server {
    /// Starts `omnibus serve` with extra flags and waits until health reports SERVING.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_tls(extra, None).await
    }

    /// As `start`, for a server that speaks TLS: the health wait and `channel()` use `tls`.
    pub async fn start_tls(extra: &[&str], tls: Option<ClientTlsConfig>) -> Server {
        Self::start_with(&model_dir(), extra, tls).await
    }

    /// As `start`, on another model directory.
    pub async fn start_in(dir: &std::path::Path, extra: &[&str]) -> Server {
        Self::start_with(dir, extra, None).await
    }

    /// As `start`, with extra environment variables for the server.
    pub async fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn(&model_dir(), extra, None, env).await
    }

    async fn start_with(dir: &std::path::Path, extra: &[&str], tls: Option<ClientTlsConfig>) -> Server {
        Self::spawn(dir, extra, tls, &[]).await
    }

    async fn spawn(
        dir: &std::path::Path,
        extra: &[&str],
        tls: Option<ClientTlsConfig>,
        env: &[(&str, &str)],
    ) -> Server {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "omnibus-{}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let stderr = std::fs::File::create(&log).expect("create the server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_omnibus"))
            .arg("serve")
            // Port 0 for metrics too: tests run in parallel.
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--model-dir"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .env("OMNIBUS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn omnibus");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (line, metrics_line) = tokio::task::spawn_blocking(move || {
            let mut out = BufReader::new(stdout);
            let (mut line, mut metrics) = (String::new(), String::new());
            out.read_line(&mut line)?;
            out.read_line(&mut metrics)?;
            Ok::<_, std::io::Error>((line, metrics))
        })
        .await
        .unwrap()
        .expect("read the listening lines");
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("omnibus listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; server log: {}", log.display()))
            .parse()
            .expect("a socket address");
        let metrics = metrics_line.trim().strip_prefix("omnibus metrics on ").map(|a| a.parse().expect("an address"));
        let server = Server { child, addr, metrics, log, tls };
        server.wait_serving().await;
        server
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    pub async fn channel(&self) -> Channel {
        let mut endpoint = Channel::from_shared(self.url()).unwrap();
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).expect("client TLS config");
        }
        endpoint.connect().await.expect("connect")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(ok.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; None if it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// GET /metrics from the metrics listener.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.expect("the server has a metrics listener");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        body
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

/// The value of one sample (`name{labels}`, labels exactly as rendered) in a scrape, 0 if absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
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
