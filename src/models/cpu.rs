//! What the CPU can do, detected once at run time, so one portable binary picks its SIMD paths on the
//! machine it runs on (a plain `cargo build --release` targets baseline x86-64, which has no AVX at all).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// AVX2 and FMA: the x86 paths of every hand-written kernel here.
    pub avx2_fma: bool,
    /// AVX-512 VNNI with 256-bit forms (AVX512VL): `vpdpbusd` does the u8 x i8 block dot in one
    /// instruction instead of two. Integer results are identical to the AVX2 path.
    pub avx512_vnni: bool,
}

pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(detect)
}

fn detect() -> Features {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2_fma = has!("avx2") && has!("fma");
        Features { avx2_fma, avx512_vnni: avx2_fma && has!("avx512vnni") && has!("avx512vl") }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Features::default()
}

/// For the start-up log: which kernels will run.
pub fn describe() -> &'static str {
    let f = features();
    if f.avx512_vnni {
        "avx512-vnni"
    } else if f.avx2_fma {
        "avx2+fma"
    } else if cfg!(target_arch = "aarch64") {
        "neon"
    } else {
        "portable"
    }
}
