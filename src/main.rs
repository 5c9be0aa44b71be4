//! The `omnibus` binary: the command line (its subcommands live here, outside the library's layers),
//! then serve until SIGTERM or SIGINT, or run one of the clients.
use anyhow::Context;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API (linked through the `mimalloc` crate; its Rust crate does not re-export it).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (stable since mimalloc 1.x as `reset_delay`;
/// libmimalloc-sys 0.1.49 builds mimalloc v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc gives memory that stayed free for `purge_delay` ms back to the OS (1 s by default), and
/// takes a page fault per 4 KiB when it is used again. A decode step allocates and frees its
/// activation and output buffers, and sequences come and go with their KV caches, so the server
/// faulted ~2,800 times a second at 8 streams (`perf stat -e page-faults`), with the kernel's page
/// clearing 1.4% of the engine thread. At 10 s it faults none in steady state, and memory idle for 10 s
/// still goes back. MIMALLOC_PURGE_DELAY, read by mimalloc at process load, wins when set.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of mimalloc's global options, called before any other thread starts.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) }
    }
}

use clap::{Parser, Subcommand};
use omnibus::client::{bench, compare, health};
use omnibus::config::ServeArgs;
use omnibus::{server, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "omnibus",
    version,
    about = "A model-serving server: gRPC embeddings and generation with dynamic batching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every model in the model directory over gRPC.
    Serve(Box<ServeArgs>),
    /// Load-test a running omnibus over gRPC and report throughput and latency percentiles.
    #[command(subcommand)]
    Bench(bench::BenchTarget),
    /// Ask a running omnibus's grpc.health.v1.Health whether it is SERVING (exit 0) or not (exit 1):
    /// the container image's HEALTHCHECK.
    Health(health::HealthArgs),
    /// Score the same texts on two running servers (teacher-forced, through Generate's prompt
    /// log-probabilities) and report how far their next-token distributions are apart.
    Compare(compare::CompareArgs),
    /// Print the SIMD paths this CPU can run, one per line, each a value for OMNIBUS_CPU_FEATURES (CI
    /// runs the numerics tests once per path).
    CpuPaths,
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(target) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(bench::run(target))
        }
        Command::Health(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let serving = runtime.block_on(health::health(args))?;
            println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
            std::process::exit(if serving { 0 } else { 1 });
        }
        Command::Compare(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(compare::run(args))
        }
        Command::CpuPaths => {
            for p in omnibus::models::kernels::cpu::paths() {
                println!("{}", p.name());
            }
            Ok(())
        }
        Command::Serve(args) => {
            omnibus::models::kernels::cpu::cap_from_env().map_err(anyhow::Error::msg)?;
            let config = args.validate()?;
            telemetry::init(config.log_format);
            tracing::info!(
                threads = %config.model.threads_source,
                simd = omnibus::models::kernels::cpu::describe(),
                "compute threads"
            );
            // candle's CPU matrix products size their thread pool from RAYON_NUM_THREADS when they first
            // run, so --threads must be in the environment before any model code.
            // SAFETY: no other thread exists yet (the runtime is built below), so nothing reads the
            // environment concurrently.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", config.model.threads.to_string()) };
            // rayon's workers run candle's ops (the device-generic paths): compute threads, so subnormals
            // are flushed there too.
            rayon::ThreadPoolBuilder::new()
                .num_threads(config.model.threads)
                .start_handler(|_| omnibus::models::kernels::cpu::flush_denormals())
                .build_global()
                .context("building the compute thread pool")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("omnibus-rt")
                .build()
                .context("building the tokio runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("binding {}", config.server.listen))?;
                let metrics = match config.server.metrics_listen {
                    Some(a) => Some(
                        tokio::net::TcpListener::bind(a)
                            .await
                            .with_context(|| format!("binding --metrics-listen {a}"))?,
                    ),
                    None => None,
                };
                let addr = listener.local_addr()?;
                // Stdout carries only these lines: scripts and tests read the bound ports (useful with :0).
                println!("omnibus listening on {addr}");
                tracing::info!(%addr, tls = config.server.tls.is_some(), "gRPC listening");
                if let Some(m) = &metrics {
                    let maddr = m.local_addr()?;
                    println!("omnibus metrics on {maddr}");
                    tracing::info!(addr = %maddr, "metrics listening at /metrics");
                }
                server::serve(config, listener, metrics, shutdown_signal()).await?;
                tracing::info!("stopped");
                Ok(())
            })
        }
    }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
