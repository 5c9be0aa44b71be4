//! The tracing subscriber: human-readable text by default, JSON lines for log pipelines.
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Logs go to stderr so that stdout stays free for the one
/// machine-readable "listening" line that scripts and tests read.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("OMNIBUS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests that start several servers in one process) is harmless: ignore it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
