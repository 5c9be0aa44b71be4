//! Autoscaling against a real Prometheus (Debian's `prometheus`, which `scripts/test` installs): three
//! real servers on loopback, scraped every second; load at one of them; the KEDA ScaledObject's exact
//! query and the HPA component's per-pod metric evaluated through Prometheus's HTTP API, and the
//! HPA's replica formula applied to the answers. The desired count must rise under load and fall back
//! to minReplicaCount when idle; the old per-pod-average query is evaluated beside, to show why it
//! scaled the wrong way.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use omnibus::server::pb::PredictRequest;

/// The HorizontalPodAutoscaler's replica count for a metric (kubernetes/kubernetes,
/// pkg/controller/podautoscaler/replica_calculator.go): with target type AverageValue the usage ratio
/// is `value / (target * current)`; within the 10% tolerance nothing changes, otherwise the new count
/// is `ceil(value / target)` (for KEDA's External metric, `value` is the query's result; for a Pods
/// metric, the sum of the per-pod values). Then `[min, max]` applies.
fn hpa_replicas(current: u32, value: f64, target: f64, min: u32, max: u32) -> u32 {
    let ratio = value / (target * current as f64);
    let desired = if (1.0 - ratio).abs() <= 0.1 { current } else { (value / target).ceil() as u32 };
    desired.clamp(min, max)
}

#[test]
fn the_replica_formula_is_the_hpa_s() {
    assert_eq!(hpa_replicas(3, 0.0, 16.0, 1, 10), 1);
    assert_eq!(hpa_replicas(3, 100.0, 16.0, 1, 10), 7);
    assert_eq!(hpa_replicas(3, 50.0, 16.0, 1, 10), 3, "within the tolerance of 3 x 16");
    assert_eq!(hpa_replicas(4, 128.0, 16.0, 1, 10), 8);
    assert_eq!(hpa_replicas(2, 1000.0, 16.0, 1, 10), 10);
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Prometheus scraping `targets` (metrics addresses) every second, each labelled as a pod of the
/// omnibus Deployment would be (the kustomize labels; `pod` as Kubernetes service discovery sets it).
async fn prometheus(targets: &[std::net::SocketAddr]) -> Prometheus {
    let binary = which("prometheus")
        .expect("prometheus is not installed: scripts/test installs Debian's package (apt-get install prometheus)");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: omnibus\n    static_configs:\n",
    );
    for (i, t) in targets.iter().enumerate() {
        config += &format!(
            "      - targets: ['{t}']\n        labels: {{app_kubernetes_io_name: omnibus, pod: omnibus-{i}}}\n"
        );
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
    let started = Instant::now();
    while http_get(&format!("{}/-/ready", p.url)).await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "prometheus never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(name)).find(|p| p.exists())
}

/// A GET over plain HTTP/1.1; the body if the status is 200.
async fn http_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut conn = tokio::net::TcpStream::connect(host).await.ok()?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Chunked bodies (Prometheus's API answers so): join the chunks.
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        return Some(out);
    }
    Some(body.to_string())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's single value (0 for an empty vector, as KEDA reads it); every series of a vector
/// result for `by_series`.
async fn query(p: &Prometheus, q: &str) -> Vec<f64> {
    let body = http_get(&format!("{}/api/v1/query?query={}", p.url, urlencode(q))).await.expect("a query answer");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .collect()
}

async fn scalar(p: &Prometheus, q: &str) -> f64 {
    query(p, q).await.into_iter().sum()
}

/// The `key: value` of the ScaledObject (its first occurrence).
fn keda(key: &str) -> String {
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/components/keda/scaledobject.yaml"))
            .unwrap();
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {key} in the ScaledObject"))
}

#[tokio::test]
async fn keda_scales_up_under_load_and_back_down_when_idle() {
    let query_text = keda("query");
    let threshold: f64 = keda("threshold").parse().unwrap();
    let (min, max): (u32, u32) = (keda("minReplicaCount").parse().unwrap(), keda("maxReplicaCount").parse().unwrap());
    // The query before the fix, for comparison: a per-pod average.
    let per_pod_average = "sum(omnibus_queue_size{app_kubernetes_io_name=\"omnibus\"}) / count(count by (pod) (omnibus_queue_size{app_kubernetes_io_name=\"omnibus\"}))";
    // Three pods; one input per batch so that a queue builds.
    let flags = ["--max-batch-size", "1", "--max-queue", "256"];
    let pods = [Server::start(&flags).await, Server::start(&flags).await, Server::start(&flags).await];
    let targets: Vec<_> = pods.iter().map(|s| s.metrics.unwrap()).collect();
    let prom = prometheus(&targets).await;
    let current = pods.len() as u32;
    // Every pod scraped.
    let started = Instant::now();
    while query(&prom, "omnibus_queue_size{app_kubernetes_io_name=\"omnibus\"}").await.len() < 3 * 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "prometheus never scraped all three pods");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let idle = scalar(&prom, &query_text).await;
    assert_eq!(idle, 0.0);
    assert_eq!(hpa_replicas(current, idle, threshold, min, max), min);

    // Load at pod 0 only: 120 callers of long inputs, each batch of one taking several ms.
    let client = pods[0].client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for i in 0..120 {
        let (mut c, stop) = (client.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = format!("caller {i} asks about {}", "queues and autoscaling ".repeat(40));
                let _ = c.predict(PredictRequest { inputs: vec![text], truncate: true, ..Default::default() }).await;
            }
        }));
    }
    // The peak the scrapes see over a few seconds.
    let (mut total, mut average, mut per_pod) = (0f64, 0f64, Vec::new());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = scalar(&prom, &query_text).await;
        if t > total {
            total = t;
            average = scalar(&prom, per_pod_average).await;
            per_pod = query(&prom, "sum by (pod) (omnibus_queue_size{app_kubernetes_io_name=\"omnibus\"})").await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let keda_desired = hpa_replicas(current, total, threshold, min, max);
    let old_desired = hpa_replicas(current, average, threshold, min, max);
    // The HPA component's Pods metric: the adapter serves each pod's own queue; the HPA sums them.
    let hpa_desired = hpa_replicas(current, per_pod.iter().sum(), threshold, min, max);
    eprintln!(
        "under load: query {query_text} = {total}, desired {keda_desired} (of {current}); the old per-pod \
         average = {average:.1}, desired {old_desired}; HPA Pods metric {per_pod:?}, desired {hpa_desired}"
    );
    assert!(total >= 64.0, "the load built a queue of only {total}");
    assert!(keda_desired > current, "KEDA would not scale out: {total} waiting -> {keda_desired} replicas");
    assert!(old_desired < keda_desired, "the per-pod average should have under-counted");
    assert_eq!(hpa_desired, keda_desired, "the HPA component agrees with KEDA");

    for c in callers {
        c.await.unwrap();
    }
    // Idle again: back to minReplicaCount once the scrapes see the empty queues.
    let started = Instant::now();
    loop {
        let t = scalar(&prom, &query_text).await;
        if t == 0.0 {
            assert_eq!(hpa_replicas(keda_desired, t, threshold, min, max), min);
            eprintln!("idle again after {:?}: query = 0, desired {min}", started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the queue never drained: {t}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
