//! Units on the command line: durations (`250us`, `2ms`, `1.5s`, `1m`) and byte sizes as Kubernetes
//! writes them (`2Gi`, `1500Mi`). Shared by the server's flags and the clients' flags, so neither
//! depends on the other.
use std::time::Duration;

/// Bytes, with an optional binary (`Ki`, `Mi`, `Gi`) or decimal (`K`, `M`, `G`) suffix, as Kubernetes
/// writes quantities.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 2Gi, 1500Mi or 2147483648"))?;
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use Ki, Mi, Gi, K, M or G")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `250us`, `2ms`, `1.5s`, `1m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500us, 2ms or 1s"))?;
    let secs = match unit.trim() {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "" | "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use ns, us, ms, s or m")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("1500Mi"), Ok(1500 << 20));
        assert_eq!(parse_bytes("2147483648"), Ok(2147483648));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert!(parse_bytes("2GB").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_millis(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }
}
