//! Prometheus metrics: the families every layer records into, and their text exposition. Plain atomics,
//! no tonic and no candle, so the batcher and the server both record here; `server::metrics_http`
//! serves `render()` on its own listener. The README lists every name; `omnibus_queue_size` is the one
//! autoscalers (KEDA, HPA) read.
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency buckets in seconds: 1 ms to 60 s, roughly x2.5 apart.
const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Per-token latency buckets in seconds: 1 ms to 1 s.
const TOKEN: &[f64] = &[0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0];
/// Batch sizes (inputs per forward pass, or sequences per decode step).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// One metric with one set of label values.
#[derive(Debug)]
pub struct Series {
    /// Counter or gauge value.
    value: AtomicI64,
    buckets: Vec<AtomicU64>,
    /// f64 bits.
    sum: AtomicU64,
}

impl Series {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: i64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    /// The last bucket is the overflow (`+Inf`); the count is derived from the buckets when rendered,
    /// so a scrape racing an observation still sees a monotonic histogram.
    pub fn observe(&self, v: f64, bounds: &[f64]) {
        let i = bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ =
            self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some((f64::from_bits(s) + v).to_bits()));
    }
}

/// A named metric and all its labelled series.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    /// Few series (models x codes), so a scan beats a map and needs no allocation to look up.
    series: Mutex<Vec<(Vec<String>, Arc<Series>)>>,
}

impl Family {
    const fn new(name: &'static str, help: &'static str, kind: Kind, labels: &'static [&'static str]) -> Self {
        Self { name, help, kind, labels, series: Mutex::new(Vec::new()) }
    }

    /// The series for these label values (in the family's label order), created at zero on first use.
    pub fn with(&self, values: &[&str]) -> Arc<Series> {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = all.iter().find(|(v, _)| v.iter().map(String::as_str).eq(values.iter().copied())) {
            return s.clone();
        }
        let n = if let Kind::Histogram(b) = self.kind { b.len() + 1 } else { 0 };
        let s = Arc::new(Series {
            value: AtomicI64::new(0),
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        });
        all.push((values.iter().map(|v| v.to_string()).collect(), s.clone()));
        s
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        if let Kind::Histogram(b) = self.kind {
            self.with(values).observe(v, b);
        }
    }

    pub fn observe_duration(&self, values: &[&str], d: Duration) {
        self.observe(values, d.as_secs_f64());
    }

    fn render(&self, out: &mut String) {
        let all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (values, s) in all.iter() {
            let labels = label_text(self.labels, values);
            match self.kind {
                Kind::Counter | Kind::Gauge if labels.is_empty() => {
                    let _ = writeln!(out, "{} {}", self.name, s.get());
                }
                Kind::Counter | Kind::Gauge => {
                    let _ = writeln!(out, "{}{{{labels}}} {}", self.name, s.get());
                }
                Kind::Histogram(bounds) => {
                    let sep = if labels.is_empty() { "" } else { "," };
                    let mut cumulative = 0;
                    for (b, c) in bounds.iter().zip(&s.buckets) {
                        cumulative += c.load(Ordering::Relaxed);
                        let _ = writeln!(out, "{}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}", self.name);
                    }
                    let count = cumulative + s.buckets[bounds.len()].load(Ordering::Relaxed);
                    let _ = writeln!(out, "{}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}", self.name);
                    let sum = f64::from_bits(s.sum.load(Ordering::Relaxed));
                    let _ = writeln!(out, "{}_sum{{{labels}}} {sum}", self.name);
                    let _ = writeln!(out, "{}_count{{{labels}}} {count}", self.name);
                }
            }
        }
    }
}

fn label_text(names: &[&str], values: &[String]) -> String {
    let mut s = String::new();
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(s, "{n}=\"{v}\"");
    }
    s
}

pub static QUEUE_SIZE: Family = Family::new(
    "omnibus_queue_size",
    "Requests admitted and waiting for the model (not yet in a batch or running); what autoscalers scale on.",
    Kind::Gauge,
    &["model"],
);
pub static RUNNING: Family = Family::new(
    "omnibus_running_sequences",
    "Generation sequences running (decoding or prefilling); for embedding models, requests in the batch computing now.",
    Kind::Gauge,
    &["model"],
);
pub static BATCH_SIZE: Family = Family::new(
    "omnibus_batch_size",
    "Inputs per embedding forward pass, or sequences per generation step.",
    Kind::Histogram(BATCH),
    &["model"],
);
pub static QUEUE_TIME: Family = Family::new(
    "omnibus_queue_time_seconds",
    "Time from admission to the start of the request's first forward pass.",
    Kind::Histogram(LATENCY),
    &["model"],
);
pub static INFERENCE_TIME: Family = Family::new(
    "omnibus_inference_time_seconds",
    "Time of one forward pass (an embedding batch, or one generation step).",
    Kind::Histogram(LATENCY),
    &["model"],
);
pub static REQUEST_DURATION: Family = Family::new(
    "omnibus_request_duration_seconds",
    "End-to-end time of a call as the server sees it (a whole stream for Generate), any outcome.",
    Kind::Histogram(LATENCY),
    &["model", "method"],
);
pub static TIME_TO_FIRST_TOKEN: Family = Family::new(
    "omnibus_time_to_first_token_seconds",
    "Generate: from arrival to the first token.",
    Kind::Histogram(LATENCY),
    &["model"],
);
pub static TIME_PER_OUTPUT_TOKEN: Family = Family::new(
    "omnibus_time_per_output_token_seconds",
    "Generate: mean time between tokens after the first, per finished stream.",
    Kind::Histogram(TOKEN),
    &["model"],
);
pub static PROMPT_TOKENS: Family = Family::new(
    "omnibus_prompt_tokens_total",
    "Tokens read: Predict inputs after truncation, Generate prompts.",
    Kind::Counter,
    &["model"],
);
pub static GENERATED_TOKENS: Family =
    Family::new("omnibus_generated_tokens_total", "Tokens generated and streamed.", Kind::Counter, &["model"]);
pub static REQUESTS: Family = Family::new(
    "omnibus_requests_total",
    "Finished calls by model version and gRPC status code (OK included).",
    Kind::Counter,
    &["model", "version", "method", "code"],
);
pub static FAILURES: Family = Family::new(
    "omnibus_request_failures_total",
    "Failed calls by gRPC status code and reason (queue_full, deadline, invalid_argument, ...).",
    Kind::Counter,
    &["model", "version", "method", "code", "reason"],
);
pub static EXPIRED_BEFORE_MODEL: Family = Family::new(
    "omnibus_expired_before_model_total",
    "Requests whose deadline passed before they reached the model: answered DEADLINE_EXCEEDED, no compute spent.",
    Kind::Counter,
    &["model"],
);
pub static INFLIGHT: Family =
    Family::new("omnibus_inflight_calls", "Calls being served now (streams included).", Kind::Gauge, &[]);
pub static KV_TOKENS: Family = Family::new(
    "omnibus_kv_tokens",
    "Generation KV-cache positions reserved by running sequences (state=used) and left in the budget (state=free).",
    Kind::Gauge,
    &["model", "state"],
);
pub static RESIDENT_MEMORY: Family = Family::new(
    "omnibus_resident_memory_bytes",
    "Resident memory of the process (models, KV caches, buffers); compare with the pod's limit.",
    Kind::Gauge,
    &[],
);
pub static MODEL_MEMORY: Family = Family::new(
    "omnibus_model_memory_bytes",
    "Memory a model takes, planned at start: its weights as loaded (kind=weights), its KV-cache budget \
     (kind=kv_budget) or its batch activations budget (kind=batch_budget).",
    Kind::Gauge,
    &["model", "kind"],
);
pub static GPU_MEMORY: Family = Family::new(
    "omnibus_gpu_memory_bytes",
    "Memory of each GPU the models run on, as its driver reports it at scrape time: state=free, used or \
     total (used includes other processes). Absent on the CPU.",
    Kind::Gauge,
    &["gpu", "state"],
);
pub static ENGINE_STALLED: Family = Family::new(
    "omnibus_engine_stalled",
    "1 while a model thread has shown no life for --engine-stall-timeout (liveness then fails), else 0.",
    Kind::Gauge,
    &["model"],
);

static ALL: &[&Family] = &[
    &KV_TOKENS,
    &RESIDENT_MEMORY,
    &MODEL_MEMORY,
    &GPU_MEMORY,
    &ENGINE_STALLED,
    &QUEUE_SIZE,
    &RUNNING,
    &BATCH_SIZE,
    &QUEUE_TIME,
    &INFERENCE_TIME,
    &REQUEST_DURATION,
    &TIME_TO_FIRST_TOKEN,
    &TIME_PER_OUTPUT_TOKEN,
    &PROMPT_TOKENS,
    &GENERATED_TOKENS,
    &REQUESTS,
    &FAILURES,
    &EXPIRED_BEFORE_MODEL,
    &INFLIGHT,
];

/// Every family's name, for documentation checks.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|f| f.name).collect()
}

/// The Prometheus text exposition (format 0.0.4) of every family.
pub fn render() -> String {
    let mut out = String::new();
    for f in ALL {
        f.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_HIST: Family = Family::new("t_seconds", "help", Kind::Histogram(&[0.1, 1.0]), &["model"]);
    static TEST_COUNTER: Family = Family::new("t_total", "help", Kind::Counter, &["model", "code"]);

    #[test]
    fn exposition_format() {
        TEST_HIST.observe(&["m\"x"], 0.05);
        TEST_HIST.observe(&["m\"x"], 0.5);
        TEST_HIST.observe(&["m\"x"], 5.0);
        TEST_COUNTER.with(&["m", "OK"]).inc();
        TEST_COUNTER.with(&["m", "OK"]).add(2);
        let mut s = String::new();
        TEST_HIST.render(&mut s);
        TEST_COUNTER.render(&mut s);
        let want = "# HELP t_seconds help\n# TYPE t_seconds histogram\n\
            t_seconds_bucket{model=\"m\\\"x\",le=\"0.1\"} 1\n\
            t_seconds_bucket{model=\"m\\\"x\",le=\"1\"} 2\n\
            t_seconds_bucket{model=\"m\\\"x\",le=\"+Inf\"} 3\n\
            t_seconds_sum{model=\"m\\\"x\"} 5.55\n\
            t_seconds_count{model=\"m\\\"x\"} 3\n\
            # HELP t_total help\n# TYPE t_total counter\nt_total{model=\"m\",code=\"OK\"} 3\n";
        assert_eq!(s, want);
    }
}
