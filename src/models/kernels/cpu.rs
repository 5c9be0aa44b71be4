//! What the CPU can do, detected once at run time (and capped by `OMNIBUS_CPU_FEATURES`), so one
//! portable binary picks its SIMD paths on the machine it runs on (a plain `cargo build --release`
//! targets baseline x86-64, which has no AVX at all); and flush-to-zero for compute threads.
//!
//! The cap exists so that one machine can run every path a slower machine would take: CI runs the
//! numerics tests once per path (`scalar`, `avx2`, `avx512`) the machine has. A cap only ever removes
//! features; asking for more than the CPU has gives what it has.

use std::sync::OnceLock;

/// The environment variable that caps run-time dispatch.
pub const CAP_VAR: &str = "OMNIBUS_CPU_FEATURES";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// AVX2 with FMA and F16C (Intel's and AMD's AVX2 CPUs all have both): the x86 paths of every
    /// hand-written kernel here.
    pub avx2_fma: bool,
    /// AVX-512 F (with AVX2 and FMA): 16-wide f32 for the encoder's matrix products.
    pub avx512f: bool,
    /// AVX-512 VNNI with 256-bit forms (AVX512VL) and byte/word ops (AVX512BW, which every VNNI CPU
    /// has): `vpdpbusd` does the u8 x i8 block dot in one instruction instead of two, on 8 or 16
    /// columns at once. Integer results are identical to the AVX2 path.
    pub avx512_vnni: bool,
}

/// A ceiling on run-time dispatch, from [`CAP_VAR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    /// Portable code only (what an x86-64 CPU without AVX2, or any other architecture, runs).
    Scalar,
    /// AVX2 and FMA, nothing of AVX-512.
    Avx2,
    /// Everything the CPU has.
    Avx512,
}

impl Cap {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" => Ok(Self::Scalar),
            "avx2" => Ok(Self::Avx2),
            "avx512" | "native" | "" => Ok(Self::Avx512),
            other => Err(format!("{CAP_VAR}: expected scalar, avx2 or avx512, got {other:?}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    fn apply(self, f: Features) -> Features {
        match self {
            Self::Scalar => Features::default(),
            Self::Avx2 => Features { avx2_fma: f.avx2_fma, ..Features::default() },
            Self::Avx512 => f,
        }
    }
}

/// The cap the environment asks for; an unparsable value is refused by `omnibus serve`'s flag check
/// ([`cap_from_env`]) and means no cap here.
fn env_cap() -> Cap {
    std::env::var(CAP_VAR).ok().and_then(|v| Cap::parse(&v).ok()).unwrap_or(Cap::Avx512)
}

/// For start-up checks: the cap in the environment, or why it cannot be read.
pub fn cap_from_env() -> Result<Cap, String> {
    match std::env::var(CAP_VAR) {
        Ok(v) => Cap::parse(&v),
        Err(_) => Ok(Cap::Avx512),
    }
}

/// The features kernels may use: the CPU's, capped by the environment.
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| env_cap().apply(detect()))
}

/// What the CPU itself has, whatever the cap.
pub fn detect() -> Features {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2_fma = has!("avx2") && has!("fma") && has!("f16c");
        let avx512f = avx2_fma && has!("avx512f");
        Features {
            avx2_fma,
            avx512f,
            avx512_vnni: avx512f && has!("avx512vnni") && has!("avx512vl") && has!("avx512bw"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Features::default()
}

/// The caps that lead to different code on this CPU, slowest first: what CI runs the numerics tests
/// under (`omnibus cpu-paths` prints them).
pub fn paths() -> Vec<Cap> {
    let f = detect();
    let mut out = vec![Cap::Scalar];
    if f.avx2_fma {
        out.push(Cap::Avx2);
    }
    if f.avx512f {
        out.push(Cap::Avx512);
    }
    out
}

/// For the start-up log: which kernels will run.
pub fn describe() -> &'static str {
    let f = features();
    if f.avx512_vnni {
        "avx512-vnni"
    } else if f.avx512f {
        "avx512f"
    } else if f.avx2_fma {
        "avx2+fma"
    } else if cfg!(target_arch = "aarch64") {
        "neon"
    } else {
        "portable"
    }
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread (MXCSR bits 15 and 6 on x86-64,
/// FPCR.FZ on arm64). Every compute thread calls it first: a subnormal float costs a ~100-cycle
/// microcode assist per operation on Intel cores, so a few of them in a padded softmax once made a
/// mixed batch 4x slower. Values that small carry nothing a model's output depends on.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's MXCSR only; bits 15 (FTZ) and 6 (DAZ) change how
    // subnormal results and inputs are treated, nothing else.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24) of this thread; flushes subnormals to zero, nothing else.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
}

/// Whether the calling thread flushes subnormals (for tests and the start-up check).
pub fn denormals_flushed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: reads this thread's MXCSR into a local.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
        csr & (1 << 15) != 0 && csr & (1 << 6) != 0
    }
    #[cfg(target_arch = "aarch64")]
    {
        let fpcr: u64;
        // SAFETY: reads this thread's FPCR.
        unsafe { std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack)) };
        fpcr & (1 << 24) != 0
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_only_remove_features() {
        let all = Features { avx2_fma: true, avx512f: true, avx512_vnni: true };
        assert_eq!(Cap::Scalar.apply(all), Features::default());
        assert_eq!(Cap::Avx2.apply(all), Features { avx2_fma: true, ..Features::default() });
        assert_eq!(Cap::Avx512.apply(all), all);
        let avx2_only = Features { avx2_fma: true, ..Features::default() };
        assert_eq!(Cap::Avx512.apply(avx2_only), avx2_only);
        assert_eq!(Cap::parse("AVX2"), Ok(Cap::Avx2));
        assert!(Cap::parse("sse9").unwrap_err().contains("OMNIBUS_CPU_FEATURES"));
        assert_eq!(paths()[0], Cap::Scalar);
    }

    #[test]
    fn flush_to_zero_flushes() {
        std::thread::spawn(|| {
            let tiny = std::hint::black_box(f32::MIN_POSITIVE);
            assert!((tiny * 0.5).is_subnormal(), "a fresh thread keeps subnormals");
            flush_denormals();
            assert!(denormals_flushed());
            assert_eq!(std::hint::black_box(tiny) * std::hint::black_box(0.5f32), 0.0);
        })
        .join()
        .unwrap();
    }
}
