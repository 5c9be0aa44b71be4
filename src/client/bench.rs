//! `omnibus bench`: a gRPC load generator for any omnibus address. Closed-loop at a fixed concurrency, or
//! open-loop at a fixed rate with latency measured from each request's scheduled start (so queueing is
//! not hidden by coordinated omission). Percentiles come from an hdrhistogram. This is a client: it
//! talks to a server only through the generated gRPC client, never to the server's internals.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::server::pb::{GenerateRequest, PredictRequest, SamplingParams, inference_client::InferenceClient};
use crate::units::parse_duration;

#[derive(Debug, Clone, Subcommand)]
pub enum BenchTarget {
    /// Drive Predict (embeddings).
    Predict(PredictArgs),
    /// Drive Generate (streamed tokens).
    Generate(GenerateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Model name (empty: the server's default).
    #[arg(long, default_value = "")]
    pub model: String,
    /// The raw prompt.
    #[arg(long, default_value = "Once upon a time, in a small village by the sea,")]
    pub prompt: String,
    /// Repeat the prompt this many times (to make long prompts for prefill figures).
    #[arg(long, default_value_t = 1)]
    pub prompt_repeat: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Requests in flight at once (closed loop), or the cap on in-flight requests (open loop).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Open loop: start this many requests per second whatever the answers; unset means closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests instead (whichever comes first).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured warm-up before the measurement.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// HTTP/2 connections, shared round-robin by the workers.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Model name (empty: the server's default).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Sentences to send, cycled through; repeat the flag for several.
    #[arg(long = "input")]
    pub inputs: Vec<String>,
    /// A file with one sentence per line, cycled through.
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// Sentences per request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub elapsed_s: f64,
    pub requests_ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub requests_per_s: f64,
    /// Items per second: sentences for Predict.
    pub items_per_s: f64,
    pub latency_ms: Percentiles,
    /// Mean of the server-reported batch sizes (Predict).
    pub mean_batch_size: f64,
    /// Generate only: time to first token and the gaps between tokens, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inter_token_ms: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// What one call measured beyond its latency.
#[derive(Default)]
struct CallStats {
    items: u64,
    batch: u64,
    ttft_us: Option<u64>,
    gaps_us: Vec<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

#[derive(Default)]
struct Tally {
    latency_us: Option<Histogram<u64>>,
    ttft_us: Option<Histogram<u64>>,
    gap_us: Option<Histogram<u64>>,
    ok: u64,
    items: u64,
    batch_sum: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, latency: Duration, result: Result<CallStats, tonic::Code>) {
        match result {
            Ok(stats) => {
                self.latency_us.get_or_insert_with(histogram).saturating_record(latency.as_micros() as u64);
                if let Some(t) = stats.ttft_us {
                    self.ttft_us.get_or_insert_with(histogram).saturating_record(t);
                }
                let gaps = self.gap_us.get_or_insert_with(histogram);
                stats.gaps_us.iter().for_each(|&g| gaps.saturating_record(g));
                self.ok += 1;
                self.items += stats.items;
                self.batch_sum += stats.batch;
            }
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }
}

pub async fn run(target: BenchTarget) -> anyhow::Result<()> {
    let args = match target {
        BenchTarget::Predict(args) => args,
        BenchTarget::Generate(args) => return run_generate(args).await,
    };
    let mut inputs = args.inputs.clone();
    if let Some(path) = &args.input_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        inputs.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    if inputs.is_empty() {
        inputs.push("The quick brown fox jumps over the lazy dog.".into());
    }
    let load = args.load.clone();
    let channels = connect(&load).await?;
    let inputs = Arc::new(inputs);
    let make = {
        let (model, batch) = (args.model.clone(), args.batch.max(1));
        move |i: u64| PredictRequest {
            model: model.clone(),
            inputs: (0..batch).map(|j| inputs[(i as usize * batch + j) % inputs.len()].clone()).collect(),
            ..Default::default()
        }
    };
    let call = move |channel: Channel, req: PredictRequest| async move {
        let mut client = InferenceClient::new(channel);
        match client.predict(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let batch = resp.metadata.map(|m| m.batch_size as u64).unwrap_or(0);
                Ok(CallStats { items: resp.outputs.len() as u64, batch, ..Default::default() })
            }
            Err(status) => Err(status.code()),
        }
    };
    if !load.warmup.is_zero() {
        drive(&load, &channels, load.warmup, None, &make, &call, true).await;
    }
    let (tally, elapsed) = drive(&load, &channels, load.duration, load.requests, &make, &call, load.quiet).await;
    let report = report(&load, &tally, elapsed);
    print_report(&report, load.json)?;
    Ok(())
}

async fn connect(load: &LoadArgs) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..load.connections.max(1) {
        let ch = Endpoint::from_shared(load.addr.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", load.addr))?;
        channels.push(ch);
    }
    Ok(channels)
}

/// Runs the load for `duration` (or `max_requests`) and returns what it saw.
async fn drive<Req, Make, Call, Fut>(
    load: &LoadArgs,
    channels: &[Channel],
    duration: Duration,
    max_requests: Option<u64>,
    make: &Make,
    call: &Call,
    quiet: bool,
) -> (Tally, Duration)
where
    Req: Send + 'static,
    Make: Fn(u64) -> Req + Clone + Send + Sync + 'static,
    Call: Fn(Channel, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<CallStats, tonic::Code>> + Send + 'static,
{
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let end = started + duration;
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let take = {
        let issued = issued.clone();
        move || {
            let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (max_requests.is_none_or(|m| n < m) && Instant::now() < end).then_some(n)
        }
    };
    let progress = (!quiet).then(|| {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = tally.lock().unwrap();
                let secs = started.elapsed().as_secs_f64();
                let errs: u64 = t.errors.values().sum();
                eprint!(
                    "\r[bench] {secs:5.1}s  ok {:>8}  errors {errs:>6}  {:>9.1} req/s   ",
                    t.ok,
                    t.ok as f64 / secs
                );
            }
        })
    });
    let mut workers = Vec::new();
    match load.rate {
        None => {
            for w in 0..load.concurrency.max(1) {
                let (tally, take, make, call) = (tally.clone(), take.clone(), make.clone(), call.clone());
                let channel = channels[w % channels.len()].clone();
                workers.push(tokio::spawn(async move {
                    while let Some(i) = take() {
                        let t0 = Instant::now();
                        let result = call(channel.clone(), make(i)).await;
                        tally.lock().unwrap().record(t0.elapsed(), result);
                    }
                }));
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(load.concurrency.max(1)));
            let mut next = Instant::now();
            while let Some(i) = take() {
                tokio::time::sleep_until(next).await;
                let scheduled = next;
                next += interval;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    // Over the in-flight cap: the client itself is saturated; count it, do not queue it.
                    tally.lock().unwrap().errors.entry("ClientSaturated".into()).and_modify(|n| *n += 1).or_insert(1);
                    continue;
                };
                let (tally, make, call) = (tally.clone(), make.clone(), call.clone());
                let channel = channels[i as usize % channels.len()].clone();
                workers.push(tokio::spawn(async move {
                    let result = call(channel, make(i)).await;
                    // From the scheduled start, not the actual one: a late start is queueing too.
                    tally.lock().unwrap().record(scheduled.elapsed(), result);
                    drop(permit);
                }));
            }
        }
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let elapsed = started.elapsed();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    (tally, elapsed)
}

fn report(load: &LoadArgs, t: &Tally, elapsed: Duration) -> Report {
    let secs = elapsed.as_secs_f64();
    let empty = Histogram::<u64>::new(3).unwrap();
    let h = t.latency_us.as_ref().unwrap_or(&empty);
    Report {
        mode: if load.rate.is_some() { "open-loop".into() } else { "closed-loop".into() },
        concurrency: load.concurrency,
        rate: load.rate,
        elapsed_s: secs,
        requests_ok: t.ok,
        errors: t.errors.clone(),
        requests_per_s: t.ok as f64 / secs,
        items_per_s: t.items as f64 / secs,
        latency_ms: Percentiles::of(h),
        mean_batch_size: if t.ok > 0 { t.batch_sum as f64 / t.ok as f64 } else { 0.0 },
        ttft_ms: t.ttft_us.as_ref().map(Percentiles::of),
        inter_token_ms: t.gap_us.as_ref().map(Percentiles::of),
    }
}

async fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let load = args.load.clone();
    let channels = connect(&load).await?;
    let prompt = vec![args.prompt.as_str(); args.prompt_repeat.max(1)].join(" ");
    let make = {
        let (model, n, temperature) = (args.model.clone(), args.max_new_tokens, args.temperature);
        move |i: u64| GenerateRequest {
            model: model.clone(),
            prompt: prompt.clone(),
            max_new_tokens: n,
            sampling: Some(SamplingParams { temperature, seed: Some(i), ..Default::default() }),
            ..Default::default()
        }
    };
    let call = |channel: Channel, req: GenerateRequest| async move {
        use crate::server::pb::generate_response::Kind;
        let started = Instant::now();
        let mut client = InferenceClient::new(channel);
        let mut stream = client.generate(req).await.map_err(|s| s.code())?.into_inner();
        let mut stats = CallStats::default();
        let mut last = started;
        while let Some(msg) = stream.message().await.map_err(|s| s.code())? {
            if let Some(Kind::Token(_)) = msg.kind {
                let now = Instant::now();
                if stats.ttft_us.is_none() {
                    stats.ttft_us = Some(now.duration_since(started).as_micros() as u64);
                } else {
                    stats.gaps_us.push(now.duration_since(last).as_micros() as u64);
                }
                last = now;
                stats.items += 1;
            }
        }
        Ok(stats)
    };
    if !load.warmup.is_zero() {
        drive(&load, &channels, load.warmup, None, &make, &call, true).await;
    }
    let (tally, elapsed) = drive(&load, &channels, load.duration, load.requests, &make, &call, load.quiet).await;
    print_report(&report(&load, &tally, elapsed), load.json)
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!("{} c={} {}", r.mode, r.concurrency, r.rate.map(|x| format!("rate={x}/s")).unwrap_or_default());
    println!("  ok requests   {:>10}  in {:.2} s", r.requests_ok, r.elapsed_s);
    println!("  throughput    {:>10.1} req/s  {:>10.1} items/s (sentences or tokens)", r.requests_per_s, r.items_per_s);
    let l = &r.latency_ms;
    println!(
        "  latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    if let Some(t) = &r.ttft_ms {
        println!("  first token   p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2} ms", t.p50, t.p90, t.p99, t.max);
    }
    if let Some(t) = &r.inter_token_ms {
        println!("  between tokens p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2} ms", t.p50, t.p90, t.p99, t.max);
    } else {
        println!("  mean batch    {:>10.2}", r.mean_batch_size);
    }
    if r.errors.is_empty() {
        println!("  errors        none");
    } else {
        for (code, n) in &r.errors {
            println!("  errors        {code}: {n}");
        }
    }
    Ok(())
}
