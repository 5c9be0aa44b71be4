//! What this process may use and does use: CPUs by the cgroup's quota, memory by its limit (cgroup v2 or
//! v1), resident memory from /proc; and the memory plan that sizes the KV cache and the embedding token
//! budget from the limit. A pod that asked for 2 CPUs on a 64-core node must not start 64 spinning
//! compute threads, and a pod limited to 2 GiB must not reserve a KV cache that grows past it.
use std::path::Path;

/// CPUs the cgroup allows (its quota over its period), if it sets a quota.
pub fn cpu_quota() -> Option<f64> {
    let root = Path::new("/sys/fs/cgroup");
    if let Ok(s) = std::fs::read_to_string(root.join("cpu.max")) {
        return parse_cpu_max(&s);
    }
    let quota = std::fs::read_to_string(root.join("cpu/cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(root.join("cpu/cpu.cfs_period_us")).ok()?;
    parse_cfs(&quota, &period)
}

/// The cgroup's memory limit in bytes, if it sets one.
pub fn memory_limit() -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let s = std::fs::read_to_string(root.join("memory.max"))
        .or_else(|_| std::fs::read_to_string(root.join("memory/memory.limit_in_bytes")))
        .ok()?;
    parse_limit(&s)
}

/// This process's resident memory in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// cgroup v2 `cpu.max`: "max 100000" (no quota) or "200000 100000" (2 CPUs).
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let (quota, period) = (it.next()?, it.next()?);
    if quota == "max" {
        return None;
    }
    let (q, p): (f64, f64) = (quota.parse().ok()?, period.parse().ok()?);
    (q > 0.0 && p > 0.0).then_some(q / p)
}

/// cgroup v1: `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let (q, p): (i64, i64) = (quota.trim().parse().ok()?, period.trim().parse().ok()?);
    (q > 0 && p > 0).then_some(q as f64 / p as f64)
}

/// "max" (v2), or a byte count; v1 writes a huge number (about 2^63) for no limit.
fn parse_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse::<u64>().ok().filter(|&b| b < 1 << 60)
}

/// Compute threads: the `requested` ones, else the cgroup's CPU quota rounded up, else every core; and
/// where the number came from, for the start-up log.
pub fn threads(requested: Option<usize>) -> (usize, String) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if let Some(t) = requested {
        return (t, format!("{t} (--threads / OMNIBUS_THREADS)"));
    }
    match cpu_quota() {
        Some(q) => {
            let t = (q.ceil() as usize).clamp(1, cores);
            (t, format!("{t} (the cgroup's CPU quota of {q:.2}, on {cores} cores)"))
        }
        None => (cores, format!("{cores} (every core: no --threads and no cgroup CPU quota)")),
    }
}

/// What the memory budget is made of, for the start-up log and the tests.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The limit the plan fits in, and where it came from; None: no limit known.
    pub limit: Option<(u64, &'static str)>,
    /// Resident memory once every model was loaded.
    pub resident: u64,
    /// Kept free for allocator slack, tokenizer and gRPC buffers.
    pub headroom: u64,
    /// KV-cache positions across running sequences (per generation model).
    pub kv_tokens: usize,
    pub kv_bytes_per_token: u64,
    /// Tokens per embedding forward pass.
    pub batch_tokens: usize,
    pub batch_bytes_per_token: u64,
}

/// What a plan starts from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInputs {
    pub limit: Option<(u64, &'static str)>,
    pub resident: u64,
    /// Bytes of KV cache per position of each generation model loaded (0 models: empty).
    pub generators: usize,
    pub kv_bytes_per_token: u64,
    /// Whether an embedding model is loaded, and its activations' bytes per token of a batch.
    pub embedders: usize,
    pub batch_bytes_per_token: u64,
    /// Set by flags: used as given (the plan then only checks them).
    pub kv_tokens: Option<usize>,
    pub batch_tokens: Option<usize>,
}

/// Defaults without a memory limit (and the most a plan gives: beyond these a budget buys nothing but
/// memory at today's batch and running-sequence limits).
pub const DEFAULT_KV_TOKENS: usize = 32_768;
pub const DEFAULT_BATCH_TOKENS: usize = 16_384;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(
        "the memory limit of {limit} MiB ({origin}) leaves nothing for the KV cache and batches: the models take \
         {resident} MiB resident and {headroom} MiB is kept free; raise the limit or serve fewer models"
    )]
    TooSmall { limit: u64, origin: &'static str, resident: u64, headroom: u64 },
    #[error(
        "{flag} {tokens} needs {need} MiB, but the memory limit of {limit} MiB ({origin}) leaves {free} MiB after \
         the models ({resident} MiB) and the headroom ({headroom} MiB)"
    )]
    Exceeds {
        flag: &'static str,
        tokens: usize,
        need: u64,
        free: u64,
        limit: u64,
        origin: &'static str,
        resident: u64,
        headroom: u64,
    },
}

const MIB: u64 = 1024 * 1024;

/// Sizes the KV cache and the embedding batch budget to fit `limit`: after the models' resident memory
/// and a headroom (an eighth of the limit, at least 64 MiB), embeddings get up to a quarter of what is
/// left and the KV cache the rest, split evenly between generation models; each capped at its default.
/// Budgets set by flags are kept, and refused if they do not fit.
pub fn plan(p: PlanInputs) -> Result<MemoryPlan, PlanError> {
    let mut out = MemoryPlan {
        limit: p.limit,
        resident: p.resident,
        headroom: 0,
        kv_tokens: p.kv_tokens.unwrap_or(DEFAULT_KV_TOKENS),
        kv_bytes_per_token: p.kv_bytes_per_token,
        batch_tokens: p.batch_tokens.unwrap_or(DEFAULT_BATCH_TOKENS),
        batch_bytes_per_token: p.batch_bytes_per_token,
    };
    let Some((limit, source)) = p.limit else { return Ok(out) };
    out.headroom = (limit / 8).max(64 * MIB);
    let free = limit.saturating_sub(p.resident + out.headroom);
    if free == 0 {
        return Err(PlanError::TooSmall {
            limit: limit / MIB,
            origin: source,
            resident: p.resident / MIB,
            headroom: out.headroom / MIB,
        });
    }
    let batch_bytes = |t: usize| if p.embedders > 0 { t as u64 * p.batch_bytes_per_token } else { 0 };
    let kv_bytes = |t: usize| t as u64 * p.kv_bytes_per_token * p.generators as u64;
    let exceeds = |flag, tokens, need: u64| PlanError::Exceeds {
        flag,
        tokens,
        need: need / MIB,
        free: free / MIB,
        limit: limit / MIB,
        origin: source,
        resident: p.resident / MIB,
        headroom: out.headroom / MIB,
    };
    out.batch_tokens = match p.batch_tokens {
        Some(t) if batch_bytes(t) > free => return Err(exceeds("--max-batch-tokens", t, batch_bytes(t))),
        Some(t) => t,
        None if p.embedders == 0 || p.batch_bytes_per_token == 0 => DEFAULT_BATCH_TOKENS,
        // A quarter of the room when generation models share it, all of it otherwise.
        None => {
            let share = if p.generators > 0 { free / 4 } else { free };
            ((share / p.batch_bytes_per_token) as usize).min(DEFAULT_BATCH_TOKENS)
        }
    };
    let left = free - batch_bytes(out.batch_tokens);
    out.kv_tokens = match p.kv_tokens {
        Some(t) if kv_bytes(t) > left => return Err(exceeds("--max-kv-tokens", t, kv_bytes(t))),
        Some(t) => t,
        None if p.generators == 0 || p.kv_bytes_per_token == 0 => DEFAULT_KV_TOKENS,
        None => ((left / (p.kv_bytes_per_token * p.generators as u64)) as usize).min(DEFAULT_KV_TOKENS),
    };
    Ok(out)
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kv = self.kv_tokens as u64 * self.kv_bytes_per_token / MIB;
        let batch = self.batch_tokens as u64 * self.batch_bytes_per_token / MIB;
        match self.limit {
            Some((limit, source)) => write!(
                f,
                "memory limit {} MiB ({source}) = models {} MiB resident + headroom {} MiB + KV cache {} positions x {} \
                 KiB = {kv} MiB + embedding batches {} tokens x {} KiB = {batch} MiB (+ {} MiB unplanned)",
                limit / MIB,
                self.resident / MIB,
                self.headroom / MIB,
                self.kv_tokens,
                self.kv_bytes_per_token / 1024,
                self.batch_tokens,
                self.batch_bytes_per_token / 1024,
                (limit / MIB).saturating_sub(self.resident / MIB + self.headroom / MIB + kv + batch),
            ),
            None => write!(
                f,
                "no memory limit (no cgroup limit, no --memory-limit): models {} MiB resident, KV cache {} positions \
                 (up to {kv} MiB), embedding batches {} tokens (up to {batch} MiB)",
                self.resident / MIB,
                self.kv_tokens,
                self.batch_tokens
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_parse() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("250000\n", "100000\n"), Some(2.5));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("2147483648\n"), Some(2 << 30));
    }

    fn inputs() -> PlanInputs {
        PlanInputs {
            limit: Some((2 << 30, "cgroup")),
            resident: 500 * MIB,
            generators: 1,
            kv_bytes_per_token: 46_080, // SmolLM2: 30 layers x 2 x 192 x 4 bytes
            embedders: 1,
            batch_bytes_per_token: 17_000,
            kv_tokens: None,
            batch_tokens: None,
        }
    }

    #[test]
    fn a_plan_fits_the_limit_and_adds_up() {
        let p = plan(inputs()).unwrap();
        let used = p.resident
            + p.headroom
            + p.kv_tokens as u64 * p.kv_bytes_per_token
            + p.batch_tokens as u64 * p.batch_bytes_per_token;
        assert!(used <= 2 << 30, "{p}");
        // 2 GiB - 500 MiB - 256 MiB = 1292 MiB: a quarter (323 MiB) would hold 19,923 tokens of
        // activations, capped at 16,384 (266 MiB); the KV cache gets the other 1,026 MiB: 23,355
        // positions of 45 KiB.
        assert_eq!(p.batch_tokens, DEFAULT_BATCH_TOKENS);
        assert_eq!(p.kv_tokens, 23_355);
        assert!(p.to_string().contains("memory limit 2048 MiB (cgroup)"), "{p}");
    }

    #[test]
    fn without_a_limit_the_defaults_hold_and_flags_are_checked_against_one() {
        let p = plan(PlanInputs { limit: None, ..inputs() }).unwrap();
        assert_eq!((p.kv_tokens, p.batch_tokens), (DEFAULT_KV_TOKENS, DEFAULT_BATCH_TOKENS));
        let err = plan(PlanInputs { kv_tokens: Some(32_768), ..inputs() }).unwrap_err();
        assert!(err.to_string().contains("--max-kv-tokens 32768 needs 1440 MiB"), "{err}");
        let err = plan(PlanInputs { limit: Some((550 * MIB, "--memory-limit")), ..inputs() }).unwrap_err();
        assert!(matches!(err, PlanError::TooSmall { .. }), "{err}");
        // Only an embedder: the batch budget takes the room, up to its default.
        let p = plan(PlanInputs { generators: 0, limit: Some((700 * MIB, "cgroup")), ..inputs() }).unwrap();
        // 700 MiB - 500 MiB - 87.5 MiB = 112.5 MiB for activations: 6,939 tokens of 17,000 bytes.
        assert_eq!(p.batch_tokens, 6_939);
    }
}
