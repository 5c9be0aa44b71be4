//! The metrics listener: `GET /metrics` in Prometheus text format over plain HTTP/1.1, on its own port so
//! scrapers never share the gRPC port's connection limits, TLS or mesh policy. One request per
//! connection; anything else gets 404 (or 405 for other methods).
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::metrics;
use crate::registry::Registry;

/// Largest request head read; a scraper's GET is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, registry: Arc<OnceLock<Arc<Registry>>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning on the error.
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(stream, &registry)).await {
                debug!(error = %e, "metrics connection timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, registry: &OnceLock<Arc<Registry>>) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => {
            if let Some(r) = registry.get() {
                refresh_gauges(r);
            }
            ("200 OK", metrics::render())
        }
        (_, "/metrics") => ("405 Method Not Allowed", "only GET\n".to_string()),
        _ => ("404 Not Found", "metrics are at /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Gauges are read from the batchers at scrape time, so they are exact when scraped.
fn refresh_gauges(registry: &Registry) {
    // A model's figures cover the versions taking requests (stable and canary), not draining ones.
    let embedders = registry.embedders().into_iter().map(|s| (s.stable.name.clone(), s.load()));
    let generators = registry.generators().into_iter().map(|s| (s.stable.name.clone(), s.load()));
    for (name, (queued, running)) in embedders.chain(generators) {
        metrics::QUEUE_SIZE.with(&[&name]).set(queued as i64);
        metrics::RUNNING.with(&[&name]).set(running as i64);
    }
    for s in registry.embedders() {
        let m = &s.stable;
        metrics::MODEL_MEMORY.with(&[&m.name, "weights"]).set(m.weight_bytes as i64);
        let batch = m.batch.max_batch_tokens as u64 * m.activation_bytes_per_token;
        metrics::MODEL_MEMORY.with(&[&m.name, "batch_budget"]).set(batch as i64);
    }
    for s in registry.generators() {
        let m = &s.stable;
        metrics::MODEL_MEMORY.with(&[&m.name, "weights"]).set(m.weight_bytes as i64);
        let kv = (m.scheduler.max_kv_tokens * m.batcher.replicas()) as u64 * m.kv_bytes_per_token;
        metrics::MODEL_MEMORY.with(&[&m.name, "kv_budget"]).set(kv as i64);
        let (used, budget) = s.kv();
        metrics::KV_TOKENS.with(&[&s.stable.name, "used"]).set(used as i64);
        metrics::KV_TOKENS.with(&[&s.stable.name, "free"]).set(budget.saturating_sub(used) as i64);
    }
    for (gpu, free, total) in registry.gpu_memory() {
        metrics::GPU_MEMORY.with(&[&gpu, "free"]).set(free as i64);
        metrics::GPU_MEMORY.with(&[&gpu, "used"]).set(total.saturating_sub(free) as i64);
        metrics::GPU_MEMORY.with(&[&gpu, "total"]).set(total as i64);
    }
    if let Some(rss) = crate::resources::resident_bytes() {
        metrics::RESIDENT_MEMORY.with(&[]).set(rss as i64);
    }
}
