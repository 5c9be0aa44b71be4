//! Command-line flags (each also an `OMNIBUS_*` environment variable), checked together at start-up and
//! turned into one typed config per layer.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::batcher::BatchConfig;
use crate::batcher::generate::GenConfig;
use crate::engine::{DeviceChoice, Placement};
pub use crate::units::{parse_bytes, parse_duration};

/// `--device`: the flag's values, mapped onto the engine's [`DeviceChoice`] (the engine knows no clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The GPUs when this build has CUDA and some are visible, else the CPU (with a warning when GPUs
    /// were asked for).
    Auto,
    /// The CPU.
    Cpu,
    /// Every visible GPU; start-up fails when this build or this machine has none.
    Cuda,
}

impl From<Device> for DeviceChoice {
    fn from(d: Device) -> Self {
        match d {
            Device::Auto => DeviceChoice::Auto,
            Device::Cpu => DeviceChoice::Cpu,
            Device::Cuda => DeviceChoice::Cuda,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelControl {
    /// The models loaded at start stay; load and unload requests are refused (FAILED_PRECONDITION).
    None,
    /// Clients may load, swap (with an optional canary) and unload model versions.
    Explicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// `omnibus serve`'s flags. A parser of its own too, so tests and tools can check a command line
/// without the binary's other subcommands.
#[derive(Debug, Clone, Parser)]
#[command(name = "omnibus serve")]
pub struct ServeArgs {
    /// Address for gRPC (h2c). Use port 0 to let the OS pick; the chosen address is printed on stdout.
    #[arg(long, env = "OMNIBUS_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Directory holding the models: a folder per sentence-transformers (BERT) model and a `.gguf` file
    /// per generation model, each version 1, or Triton's versioned layout `NAME/1/`, `NAME/2/`, ... (the
    /// highest version loads at start); `python3 models/fetch.py` fills it with the defaults.
    #[arg(long, env = "OMNIBUS_MODEL_DIR", default_value = "models")]
    pub model_dir: PathBuf,

    /// Embedding model that an empty `model` field resolves to (default: all-MiniLM-L6-v2 when present,
    /// else the only or first one found).
    #[arg(long, env = "OMNIBUS_EMBEDDING_MODEL")]
    pub embedding_model: Option<String>,

    /// Generation model that an empty `model` field resolves to (default: SmolLM2-135M-Instruct.Q4_1
    /// when present, else the first GGUF file found).
    #[arg(long, env = "OMNIBUS_GENERATION_MODEL")]
    pub generation_model: Option<String>,

    /// Most sequences decoded together by a generation model. More streams share each pass over the
    /// weights (throughput) but each waits for a longer step (latency per token).
    #[arg(long, env = "OMNIBUS_MAX_RUNNING_SEQS", default_value_t = 16)]
    pub max_running_seqs: u32,

    /// KV-cache positions reserved across running sequences (each reserves prompt + max_new_tokens).
    /// Bounds generation memory: about 46 KiB per position for SmolLM2-135M. Default: sized from the
    /// memory limit (the cgroup's, or --memory-limit) once the models are loaded, logged at start;
    /// 32768 without a limit.
    #[arg(long, env = "OMNIBUS_MAX_KV_TOKENS")]
    pub max_kv_tokens: Option<u32>,

    /// The memory the server must fit in (e.g. `2Gi`, `1500Mi`, bytes): sizes the default KV cache and
    /// embedding batch budgets. Default: the cgroup's memory limit, if there is one.
    #[arg(long, env = "OMNIBUS_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub memory_limit: Option<u64>,

    /// On GPUs: the share of each GPU's memory omnibus may fill. Once the models are loaded, the KV
    /// budget defaults to what is free beyond the rest ((1 - fraction) of the total), read once from
    /// the driver and logged; --max-kv-tokens overrides it.
    #[arg(long, env = "OMNIBUS_GPU_MEMORY_FRACTION", default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,

    /// Generate requests that may wait for a running slot; beyond it RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "OMNIBUS_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: u32,

    /// The largest max_new_tokens a request may ask for.
    #[arg(long, env = "OMNIBUS_MAX_NEW_TOKENS", default_value_t = 2048)]
    pub max_new_tokens: u32,

    /// Prompt tokens read per decode step across new sequences (chunked prefill): a long prompt is read
    /// in chunks so running streams keep getting tokens while it loads, and prompts that arrive together
    /// get their first tokens one chunk after another instead of all at the end. Default: on the CPU 32,
    /// or 256 while a sequence is alone (nothing runs beside it to stall, and longer steps are faster per
    /// token); 512 on GPUs. Set, it holds in every case.
    #[arg(long, env = "OMNIBUS_PREFILL_CHUNK")]
    pub prefill_chunk: Option<u32>,

    /// Most inputs computed in one forward pass. Larger batches raise throughput per core until the
    /// batch stops fitting in cache; they also bound how many inputs one request may carry.
    #[arg(long, env = "OMNIBUS_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: u32,

    /// The batching window: how long the oldest waiting request may wait for company before a partial
    /// batch runs (e.g. `500us`, `2ms`). Adds up to this much latency at low load; under load batches
    /// fill while the model is busy, so the window rarely matters there.
    #[arg(long, env = "OMNIBUS_MAX_QUEUE_DELAY", default_value = "1ms", value_parser = parse_duration)]
    pub max_queue_delay: Duration,

    /// Token budget per batch: the sum of the inputs' lengths (the encoder packs a batch's tokens end to
    /// end, no padding). Bounds the memory and latency of one forward pass. Default: 16384, less when
    /// the memory limit calls for it (see --memory-limit).
    #[arg(long, env = "OMNIBUS_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<u32>,

    /// Requests that may wait per model. Beyond it calls get RESOURCE_EXHAUSTED at once instead of
    /// queueing without bound, so a client or autoscaler learns of overload immediately.
    #[arg(long, env = "OMNIBUS_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: u32,

    /// Compute threads for the model's matrix products. Default: the cgroup's CPU quota rounded up when
    /// there is one (a pod's CPU limit), else every core; Kubernetes manifests set it from the pod's CPU
    /// request (downward API), so a pod never starts one spinning thread per core of its node.
    #[arg(long, env = "OMNIBUS_THREADS")]
    pub threads: Option<usize>,

    /// Where models run.
    #[arg(long, env = "OMNIBUS_DEVICE", value_enum, default_value_t = Device::Auto)]
    pub device: Device,

    /// Pins a model to some of the visible GPUs instead of a replica on every one: MODEL=GPU[,GPU...],
    /// GPUs by index among the visible ones (0 is the first). Repeat the flag per model (in the
    /// environment, separate them with `;`). Ignored on the CPU.
    #[arg(long = "place", env = "OMNIBUS_PLACE", value_name = "MODEL=GPUS", value_delimiter = ';')]
    pub place: Vec<Placement>,

    /// Log line format.
    #[arg(long, env = "OMNIBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address of the Prometheus metrics listener (`GET /metrics`), or `off`.
    #[arg(long, env = "OMNIBUS_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,

    /// Deadline for calls that set no `grpc-timeout` (e.g. `30s`, `2m`); `0` means none. Calls that set
    /// one keep their own.
    #[arg(long, env = "OMNIBUS_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// The deadline of generation streams (Generate, ModelStreamInfer) that set no grpc-timeout: a long
    /// generation must not be cut at the unary --request-timeout; `0`: none.
    #[arg(long, env = "OMNIBUS_STREAM_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub stream_timeout: Duration,

    /// Largest request or response message in bytes. gRPC's usual 4 MiB is too small for big embedding
    /// batches; larger requests get RESOURCE_EXHAUSTED saying so.
    #[arg(long, env = "OMNIBUS_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024 * 1024)]
    pub max_message_size: usize,

    /// Concurrent HTTP/2 streams (calls) per connection.
    #[arg(long, env = "OMNIBUS_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// Largest request metadata (headers), in bytes as HTTP/2 counts them (names and values plus 32 per
    /// entry). A call above it gets RESOURCE_EXHAUSTED alone; the connection and its other calls go on.
    /// The default is above Envoy's 60 KiB, so whatever a mesh forwards is accepted.
    #[arg(long, env = "OMNIBUS_MAX_HEADER_BYTES", default_value_t = 96 * 1024)]
    pub max_header_bytes: usize,

    /// A new connection must send the HTTP/2 preface and first frame (or a TLS hello) within this long,
    /// or it is closed: sockets that connect and say nothing would otherwise hold a descriptor for ever.
    #[arg(long, env = "OMNIBUS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A model thread that shows no life this long (a hung forward pass, a deadlock) turns health
    /// NOT_SERVING for the whole server, so the liveness probe fails and Kubernetes restarts the pod;
    /// `0`: never. Keep it above the longest legitimate forward pass (seconds, for a full batch).
    #[arg(long, env = "OMNIBUS_ENGINE_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub engine_stall_timeout: Duration,

    /// Close a connection that has had no call open for this long (`0`: never). gRPC clients reconnect
    /// transparently when they next call.
    #[arg(long, env = "OMNIBUS_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT: how long in-flight calls may run on after health turns NOT_SERVING and new
    /// calls are refused; what is left then ends with UNAVAILABLE. Keep it below Kubernetes'
    /// terminationGracePeriodSeconds minus the preStop pause.
    #[arg(long, env = "OMNIBUS_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// HTTP/2 keepalive: ping an idle connection this often (`0`: never) ...
    #[arg(long, env = "OMNIBUS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// ... and close it when a ping is not answered within this long.
    #[arg(long, env = "OMNIBUS_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Close connections (GOAWAY, after their calls finish) once they are this old, give or take 10%
    /// chosen at start-up, so clients reconnect and spread over new replicas after a scale-out; `0`:
    /// never.
    #[arg(long, env = "OMNIBUS_MAX_CONNECTION_AGE", default_value = "5m", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// How long calls on an aged connection may still run before it is closed anyway.
    #[arg(long, env = "OMNIBUS_MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// PEM certificate chain: serve TLS (HTTP/2 over TLS) instead of plaintext h2c. Needs --tls-key.
    /// Behind a mesh sidecar that terminates mTLS, leave it unset.
    #[arg(long, env = "OMNIBUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "OMNIBUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "OMNIBUS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Whether RepositoryModelLoad/Unload (the Open Inference Protocol's repository extension) may load,
    /// swap and unload model versions at run time. Off by default, as in Triton: anyone who can call
    /// Predict could otherwise unload the model.
    #[arg(long, env = "OMNIBUS_MODEL_CONTROL_MODE", value_enum, default_value = "none")]
    pub model_control_mode: ModelControl,

    /// How long a batch-priority request may be passed over by interactive ones: a batch request is
    /// served as if it had arrived this much later, so it yields to newer interactive traffic but never
    /// waits forever.
    #[arg(long, env = "OMNIBUS_BATCH_PRIORITY_DELAY", default_value = "2s", value_parser = parse_duration)]
    pub batch_priority_delay: Duration,
}

/// What the server layer needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub request_timeout: Option<Duration>,
    pub stream_timeout: Option<Duration>,
    pub max_message_size: usize,
    pub max_concurrent_streams: u32,
    pub max_header_bytes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub engine_stall_timeout: Option<Duration>,
    pub shutdown_grace: Duration,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Already jittered.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
    pub tls: Option<TlsFiles>,
    pub model_control: ModelControl,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Generation limits and the scheduler's.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub scheduler: GenConfig,
    pub max_new_tokens: usize,
    /// `None`: the engine's default for its device.
    pub prefill_chunk: Option<usize>,
}

/// What the registry needs to find and load models.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_dir: PathBuf,
    pub embedding_model: Option<String>,
    pub generation_model: Option<String>,
    pub threads: usize,
    /// Where `threads` came from, for the start-up log.
    pub threads_source: String,
    pub device: DeviceChoice,
    /// `--place`: models pinned to some GPUs.
    pub placements: Vec<Placement>,
    pub memory: MemoryConfig,
}

/// What the memory plan starts from (see `resources::plan`): the limit to fit, and the budgets flags set.
#[derive(Debug, Clone, Default)]
pub struct MemoryConfig {
    pub limit: Option<(u64, &'static str)>,
    pub kv_tokens: Option<usize>,
    pub batch_tokens: Option<usize>,
    /// `--gpu-memory-fraction`.
    pub gpu_fraction: f64,
}

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub server: ServerConfig,
    pub batch: BatchConfig,
    pub generate: GenerateConfig,
    pub model: ModelConfig,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{flag} must be at least {min}, got {got}")]
    TooSmall { flag: &'static str, min: u64, got: u64 },
    #[error("--{flag} must be at most {max}, got {got}")]
    TooLarge { flag: &'static str, max: u64, got: u64 },
    #[error(
        "--max-queue ({queue}) must be at least --max-batch-size ({batch}): a full batch of single-input \
         requests has to fit in the queue, or batches could never fill"
    )]
    QueueSmallerThanBatch { queue: u32, batch: u32 },
    #[error(
        "--max-kv-tokens ({kv}) must exceed --max-new-tokens ({new}): one sequence of a one-token prompt and \
         the longest allowed answer has to fit"
    )]
    KvBelowNewTokens { kv: u32, new: u32 },
    #[error("--gpu-memory-fraction must be above 0 and at most 1, got {0}")]
    GpuMemoryFraction(String),
    #[error("--model-dir {0:?} does not exist; run `python3 models/fetch.py` or point it at your models")]
    NoModelDir(PathBuf),
    #[error("--metrics-listen {0:?} is neither an address like 0.0.0.0:9090 nor `off`")]
    MetricsListen(String),
    #[error("--{flag} {path:?} does not exist")]
    NoFile { flag: &'static str, path: PathBuf },
}

impl ServeArgs {
    /// Checks the flags together and splits them into per-layer configs.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        fn at_least(flag: &'static str, got: u64, min: u64) -> Result<(), ConfigError> {
            if got < min { Err(ConfigError::TooSmall { flag, min, got }) } else { Ok(()) }
        }
        fn at_most(flag: &'static str, got: u64, max: u64) -> Result<(), ConfigError> {
            if got > max { Err(ConfigError::TooLarge { flag, max, got }) } else { Ok(()) }
        }
        at_least("max-batch-size", self.max_batch_size.into(), 1)?;
        // Beyond a few thousand inputs one forward pass takes seconds and its activations gigabytes.
        at_most("max-batch-size", self.max_batch_size.into(), 4096)?;
        at_least("max-queue", self.max_queue.into(), 1)?;
        at_most("max-queue", self.max_queue.into(), 1_000_000)?;
        if let Some(t) = self.max_batch_tokens {
            at_least("max-batch-tokens", t.into(), 1)?;
        }
        // A window above 10 s is a misconfiguration (a unit typo), never a batching strategy.
        at_most("max-queue-delay (in ms)", self.max_queue_delay.as_millis() as u64, 10_000)?;
        if let Some(t) = self.threads {
            at_least("threads", t as u64, 1)?;
            at_most("threads", t as u64, 1024)?;
        }
        let (threads, threads_source) = crate::resources::threads(self.threads);
        at_least("max-running-seqs", self.max_running_seqs.into(), 1)?;
        at_most("max-running-seqs", self.max_running_seqs.into(), 1024)?;
        at_least("max-waiting", self.max_waiting.into(), 1)?;
        at_least("max-new-tokens", self.max_new_tokens.into(), 1)?;
        if let Some(chunk) = self.prefill_chunk {
            at_least("prefill-chunk", chunk.into(), 1)?;
        }
        if let Some(kv) = self.max_kv_tokens
            && kv < self.max_new_tokens + 1
        {
            return Err(ConfigError::KvBelowNewTokens { kv, new: self.max_new_tokens });
        }
        if !(self.gpu_memory_fraction > 0.0 && self.gpu_memory_fraction <= 1.0) {
            return Err(ConfigError::GpuMemoryFraction(self.gpu_memory_fraction.to_string()));
        }
        if let Some(m) = self.memory_limit {
            // Below 128 MiB not even one model and its runtime fit.
            at_least("memory-limit (in MiB)", m >> 20, 128)?;
        }
        if self.max_queue < self.max_batch_size {
            return Err(ConfigError::QueueSmallerThanBatch { queue: self.max_queue, batch: self.max_batch_size });
        }
        if !self.model_dir.exists() {
            return Err(ConfigError::NoModelDir(self.model_dir));
        }
        let metrics_listen = match self.metrics_listen.as_str() {
            "off" | "" => None,
            a => Some(a.parse().map_err(|_| ConfigError::MetricsListen(a.to_string()))?),
        };
        // Below 1 KiB not even a short Predict fits; above 2 GiB HTTP/2 framing breaks down.
        at_least("max-message-size", self.max_message_size as u64, 1024)?;
        at_most("max-message-size", self.max_message_size as u64, i32::MAX as u64)?;
        at_least("max-concurrent-streams", self.max_concurrent_streams.into(), 1)?;
        // Below 8 KiB ordinary clients (user agents, tracing headers) would be refused; above 16 MiB one
        // call's metadata costs more memory than a mesh would ever forward.
        at_least("max-header-bytes", self.max_header_bytes as u64, 8 * 1024)?;
        at_most("max-header-bytes", self.max_header_bytes as u64, 16 * 1024 * 1024)?;
        at_least("handshake-timeout (in ms)", self.handshake_timeout.as_millis() as u64, 1)?;
        at_most("shutdown-grace (in s)", self.shutdown_grace.as_secs(), 3600)?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                for (flag, path) in [("tls-cert", &cert), ("tls-key", &key)] {
                    if !path.exists() {
                        return Err(ConfigError::NoFile { flag, path: path.clone() });
                    }
                }
                if let Some(ca) = &self.tls_client_ca
                    && !ca.exists()
                {
                    return Err(ConfigError::NoFile { flag: "tls-client-ca", path: ca.clone() });
                }
                Some(TlsFiles { cert, key, client_ca: self.tls_client_ca })
            }
            _ => None,
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(ServeConfig {
            server: ServerConfig {
                listen: self.listen,
                metrics_listen,
                request_timeout: nonzero(self.request_timeout),
                stream_timeout: nonzero(self.stream_timeout),
                max_message_size: self.max_message_size,
                max_concurrent_streams: self.max_concurrent_streams,
                max_header_bytes: self.max_header_bytes,
                handshake_timeout: self.handshake_timeout,
                idle_timeout: nonzero(self.idle_timeout),
                engine_stall_timeout: nonzero(self.engine_stall_timeout),
                shutdown_grace: self.shutdown_grace,
                keepalive_interval: nonzero(self.keepalive_interval),
                keepalive_timeout: self.keepalive_timeout,
                max_connection_age: nonzero(self.max_connection_age).map(jitter),
                max_connection_age_grace: self.max_connection_age_grace,
                tls,
                model_control: self.model_control_mode,
            },
            batch: BatchConfig {
                max_batch_size: self.max_batch_size as usize,
                max_queue_delay: self.max_queue_delay,
                max_batch_tokens: self.max_batch_tokens.map_or(crate::resources::DEFAULT_BATCH_TOKENS, |t| t as usize),
                max_queue: self.max_queue as usize,
                batch_priority_delay: self.batch_priority_delay,
            },
            generate: GenerateConfig {
                scheduler: GenConfig {
                    max_running: self.max_running_seqs as usize,
                    max_kv_tokens: self.max_kv_tokens.map_or(crate::resources::DEFAULT_KV_TOKENS, |t| t as usize),
                    max_waiting: self.max_waiting as usize,
                    max_queue_delay: self.max_queue_delay,
                    batch_priority_delay: self.batch_priority_delay,
                },
                max_new_tokens: self.max_new_tokens as usize,
                prefill_chunk: self.prefill_chunk.map(|c| c as usize),
            },
            model: ModelConfig {
                model_dir: self.model_dir,
                embedding_model: self.embedding_model,
                generation_model: self.generation_model,
                threads,
                threads_source,
                device: self.device.into(),
                placements: self.place,
                memory: MemoryConfig {
                    limit: match self.memory_limit {
                        Some(b) => Some((b, "--memory-limit")),
                        None => crate::resources::memory_limit().map(|b| (b, "the cgroup's limit")),
                    },
                    kv_tokens: self.max_kv_tokens.map(|t| t as usize),
                    gpu_fraction: self.gpu_memory_fraction,
                    batch_tokens: self.max_batch_tokens.map(|t| t as usize),
                },
            },
            log_format: self.log_format,
        })
    }
}

/// `age` give or take up to 10%, chosen once per process: replicas started together then do not send
/// their GOAWAYs in step (tonic applies one age to every connection of a server).
fn jitter(age: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::process::id()) % 2001; // 0..=2000
    age.mul_f64(0.9 + r as f64 / 10_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["omnibus", "--model-dir", "."];
        argv.extend_from_slice(extra);
        ServeArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let cfg = args(&[]).validate().unwrap();
        assert_eq!(cfg.batch.max_batch_size, 32);
        assert_eq!(cfg.batch.max_queue_delay, Duration::from_millis(1));
        assert!(cfg.model.threads >= 1);
    }

    #[test]
    fn flags_are_checked_together() {
        let err = args(&["--max-batch-size", "64", "--max-queue", "8"]).validate().unwrap_err();
        assert_eq!(err, ConfigError::QueueSmallerThanBatch { queue: 8, batch: 64 });
        assert!(err.to_string().contains("--max-queue (8)"));
        let err = args(&["--max-batch-size", "0"]).validate().unwrap_err();
        assert_eq!(err, ConfigError::TooSmall { flag: "max-batch-size", min: 1, got: 0 });
        let err = args(&["--max-queue-delay", "20s"]).validate().unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }));
        let err = args(&["--metrics-listen", "nine"]).validate().unwrap_err();
        assert_eq!(err, ConfigError::MetricsListen("nine".into()));
        assert!(args(&["--metrics-listen", "off"]).validate().unwrap().server.metrics_listen.is_none());
        let err = args(&["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"]).validate().unwrap_err();
        assert!(matches!(err, ConfigError::NoFile { flag: "tls-cert", .. }));
        assert!(ServeArgs::try_parse_from(["omnibus", "--tls-cert", "c.pem"]).is_err(), "cert needs a key");
        for bad in ["0", "1.5", "-0.2", "NaN"] {
            let err = args(&[&format!("--gpu-memory-fraction={bad}")]).validate().unwrap_err();
            assert!(err.to_string().starts_with("--gpu-memory-fraction must be above 0 and at most 1"), "{err}");
        }
        assert_eq!(args(&[]).validate().unwrap().model.memory.gpu_fraction, 0.9);
        let p = args(&["--place", "a=0", "--place", "b=1,2"]).validate().unwrap().model.placements;
        assert_eq!(p.iter().map(|p| p.gpus.clone()).collect::<Vec<_>>(), vec![vec![0], vec![1, 2]]);
    }

    #[test]
    fn operating_defaults() {
        let s = args(&[]).validate().unwrap().server;
        assert_eq!(s.request_timeout, Some(Duration::from_secs(60)));
        assert_eq!(s.shutdown_grace, Duration::from_secs(25));
        let age = s.max_connection_age.unwrap();
        assert!(age >= Duration::from_secs(270) && age <= Duration::from_secs(330), "{age:?}");
        assert_eq!(s.max_message_size, 64 << 20);
        assert_eq!(args(&["--request-timeout", "0"]).validate().unwrap().server.request_timeout, None);
    }
}
