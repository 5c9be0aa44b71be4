//! Device choice, in one place and logged: which devices the models run on, from `--device`, the
//! build, and what the NVIDIA container runtime (`NVIDIA_VISIBLE_DEVICES`) and the CUDA driver
//! (`CUDA_VISIBLE_DEVICES`) make visible. Every visible GPU gets its own replica of every model, unless
//! `--place` pins a model to some of them; on the CPU there is one. The parsing, the plan and the
//! placement are pure functions, unit-tested without a GPU.
use candle_core::Device;
use tracing::{info, warn};

use super::EngineError;

/// Where models run, as the operator asked (`--device` maps onto this in `config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPUs when this build has CUDA and some are visible, else the CPU (with a warning when GPUs
    /// were asked for).
    Auto,
    /// The CPU.
    Cpu,
    /// Every visible GPU; start-up fails when this build or this machine has none.
    Cuda,
}

/// What the environment says about GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// Nothing restricts them (a host, or a container without the NVIDIA runtime's variable).
    Unrestricted,
    /// Every GPU there is (`NVIDIA_VISIBLE_DEVICES=all`).
    All,
    /// These GPUs, by index or UUID; the driver renumbers them from 0.
    Listed(Vec<String>),
    /// None, and why (`void`, `none`, an empty `CUDA_VISIBLE_DEVICES`, ...).
    Hidden(String),
}

/// Reads `NVIDIA_VISIBLE_DEVICES` (as the NVIDIA container runtime sets it: unset, `void`, `none`,
/// `all`, or a comma list of indices or `GPU-...` UUIDs) and `CUDA_VISIBLE_DEVICES` (which the driver
/// applies on top: empty or `-1` hides everything, and a list stops at its first invalid entry).
pub fn parse_visible(nvidia: Option<&str>, cuda: Option<&str>) -> Visible {
    let list = |s: &str| -> Vec<String> { s.split(',').map(|x| x.trim().to_string()).collect() };
    let from_nvidia = match nvidia.map(str::trim) {
        None => Visible::Unrestricted,
        Some("") | Some("void") => Visible::Hidden("NVIDIA_VISIBLE_DEVICES is empty or `void`".into()),
        Some("none") => Visible::Hidden("NVIDIA_VISIBLE_DEVICES=none".into()),
        Some("all") => Visible::All,
        Some(s) => {
            let ids: Vec<String> = list(s).into_iter().filter(|x| !x.is_empty()).collect();
            if ids.is_empty() {
                Visible::Hidden(format!("NVIDIA_VISIBLE_DEVICES={s:?} names no GPU"))
            } else {
                Visible::Listed(ids)
            }
        }
    };
    let Some(cuda) = cuda.map(str::trim) else { return from_nvidia };
    // The driver takes entries up to the first it cannot parse (a negative index ends the list).
    let valid: Vec<String> = list(cuda)
        .into_iter()
        .take_while(|x| x.parse::<u32>().is_ok() || x.starts_with("GPU-") || x.starts_with("MIG-"))
        .collect();
    if valid.is_empty() {
        return Visible::Hidden(format!("CUDA_VISIBLE_DEVICES={cuda:?} hides every GPU"));
    }
    match from_nvidia {
        Visible::Hidden(why) => Visible::Hidden(why),
        Visible::Listed(n) if n.len() < valid.len() => Visible::Listed(n),
        _ => Visible::Listed(valid),
    }
}

/// `--place MODEL=GPUS`: a model pinned to some of the visible GPUs (indices as the driver numbers the
/// visible ones, from 0), e.g. a small embedder on one MIG slice and the LLM on another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub model: String,
    pub gpus: Vec<usize>,
}

impl std::str::FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (model, list) = s
            .split_once('=')
            .filter(|(m, l)| !m.trim().is_empty() && !l.trim().is_empty())
            .ok_or_else(|| format!("--place {s:?}: expected MODEL=GPU[,GPU...], e.g. all-MiniLM-L6-v2=0"))?;
        let mut gpus = Vec::new();
        for g in list.split(',') {
            let i = g.trim().parse::<usize>().map_err(|_| {
                format!("--place {s:?}: {g:?} is not a GPU index (0 for the first visible GPU, 1 for the next, ...)")
            })?;
            if !gpus.contains(&i) {
                gpus.push(i);
            }
        }
        Ok(Self { model: model.trim().to_string(), gpus })
    }
}

/// Which of the planned devices (`devices` of them, GPUs when `on_gpus`) a model's replicas go on:
/// every one, unless a placement names the model. On the CPU there is one device and placements do
/// not apply. A GPU index beyond the visible ones is an error naming the bound.
pub fn place(model: &str, devices: usize, on_gpus: bool, placements: &[Placement]) -> Result<Vec<usize>, String> {
    let Some(p) = placements.iter().find(|p| p.model == model).filter(|_| on_gpus) else {
        return Ok((0..devices).collect());
    };
    match p.gpus.iter().find(|&&g| g >= devices) {
        Some(g) => Err(format!(
            "--place {model}={g}: only {devices} GPU(s) are visible (indices 0 to {})",
            devices.saturating_sub(1)
        )),
        None => Ok(p.gpus.clone()),
    }
}

/// Free and total memory of a GPU as its driver reports them, in bytes; None on the CPU.
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok().map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// The KV positions one GPU can hold: what is free beyond the share kept back (`1 - fraction` of the
/// total, for activations, the runtime and other processes), over the bytes one position takes.
pub fn gpu_kv_tokens(free: u64, total: u64, fraction: f64, kv_bytes_per_token: u64) -> usize {
    let kept = ((1.0 - fraction.clamp(0.0, 1.0)) * total as f64) as u64;
    (free.saturating_sub(kept) / kv_bytes_per_token.max(1)) as usize
}

/// Whether `device` runs the device-generic models (candle's ops: the decoder of `models::llama_device`,
/// candle's packed BERT): every device but the CPU, and the CPU too when `OMNIBUS_ENGINE=device-generic`
/// (how the tests and `scripts/gpu-check` run the GPU's graph on the CPU).
pub fn device_generic(device: &Device) -> bool {
    !device.is_cpu() || std::env::var("OMNIBUS_ENGINE").is_ok_and(|v| v == "device-generic")
}

/// Where one replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda(usize),
}

/// The devices to load every model on, and a warning to log if the plan is a fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<Target>,
    pub warning: Option<String>,
}

const NO_CUDA_BUILD: &str = "this omnibus binary was built without CUDA; GPU hosts need the CUDA build \
     (`cargo build --release --features cuda`, or the image's `cuda` target), or use --device cpu";

/// Decides the replicas. `gpu_count` asks the driver how many GPUs it sees (after both variables); it
/// is only called when GPUs are wanted and the build has CUDA.
pub fn plan(
    choice: DeviceChoice,
    visible: &Visible,
    cuda_built: bool,
    gpu_count: impl FnOnce() -> Result<usize, String>,
) -> Result<Plan, EngineError> {
    let cpu = |warning: Option<String>| Ok(Plan { targets: vec![Target::Cpu], warning });
    let wanted_gpus = matches!(visible, Visible::All | Visible::Listed(_));
    match choice {
        DeviceChoice::Cpu => cpu(None),
        DeviceChoice::Cuda if !cuda_built => Err(EngineError::Device(format!("--device cuda: {NO_CUDA_BUILD}"))),
        DeviceChoice::Auto if !cuda_built => {
            cpu(wanted_gpus.then(|| format!("GPUs are visible to this container but {NO_CUDA_BUILD}")))
        }
        DeviceChoice::Cuda | DeviceChoice::Auto => {
            if let Visible::Hidden(why) = visible {
                return if choice == DeviceChoice::Cuda {
                    Err(EngineError::Device(format!("--device cuda, but {why}")))
                } else {
                    cpu(None)
                };
            }
            let found = gpu_count()
                .and_then(|n| if n == 0 { Err("the CUDA driver reports no GPU".to_string()) } else { Ok(n) });
            match found {
                Ok(n) => {
                    let n = match visible {
                        Visible::Listed(l) => n.min(l.len()),
                        _ => n,
                    }
                    .max(1);
                    Ok(Plan { targets: (0..n).map(Target::Cuda).collect(), warning: None })
                }
                Err(e) if choice == DeviceChoice::Cuda => {
                    Err(EngineError::Device(format!("--device cuda: no usable GPU ({e}); {DRIVER_HINT}")))
                }
                Err(e) => cpu(Some(format!("no usable GPU ({e}); running on the CPU"))),
            }
        }
    }
}

/// The plan for this process: its flags, its environment, its build and its driver.
pub fn plan_devices(choice: DeviceChoice) -> Result<Vec<Device>, EngineError> {
    let visible = parse_visible(
        std::env::var("NVIDIA_VISIBLE_DEVICES").ok().as_deref(),
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
    );
    let plan = plan(choice, &visible, cfg!(feature = "cuda"), gpu_count)?;
    if let Some(w) = &plan.warning {
        warn!("{w}");
    }
    let devices = plan.targets.iter().map(|t| open(*t)).collect::<Result<Vec<_>, _>>()?;
    info!(devices = %devices.iter().map(device_name).collect::<Vec<_>>().join(","), ?visible, "models run on");
    Ok(devices)
}

#[cfg(feature = "cuda")]
fn gpu_count() -> Result<usize, String> {
    use candle_core::cuda_backend::cudarc::driver::result;
    result::init().map_err(|e| format!("CUDA driver: {e}"))?;
    result::device::get_count().map(|n| n as usize).map_err(|e| format!("CUDA driver: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> Result<usize, String> {
    Err(NO_CUDA_BUILD.into())
}

fn open(target: Target) -> Result<Device, EngineError> {
    match target {
        Target::Cpu => Ok(Device::Cpu),
        Target::Cuda(i) => {
            Device::new_cuda(i).map_err(|e| EngineError::Device(format!("CUDA device {i}: {e}; {DRIVER_HINT}")))
        }
    }
}

const DRIVER_HINT: &str = "is the NVIDIA driver installed and a GPU visible (nvidia-smi)?";

/// A short name for logs and ListModels.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(xs: &[&str]) -> Visible {
        Visible::Listed(xs.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn parses_what_the_nvidia_runtime_and_the_driver_set() {
        assert_eq!(parse_visible(None, None), Visible::Unrestricted);
        assert_eq!(parse_visible(Some("all"), None), Visible::All);
        assert!(matches!(parse_visible(Some("void"), None), Visible::Hidden(_)));
        assert!(matches!(parse_visible(Some(""), None), Visible::Hidden(_)));
        assert!(matches!(parse_visible(Some("none"), None), Visible::Hidden(_)));
        assert_eq!(parse_visible(Some("0,2"), None), listed(&["0", "2"]));
        assert_eq!(
            parse_visible(Some("GPU-3f1c2b7e-aaaa-bbbb-cccc-0123456789ab"), None),
            listed(&["GPU-3f1c2b7e-aaaa-bbbb-cccc-0123456789ab"])
        );
        // CUDA_VISIBLE_DEVICES narrows further, and hides everything when empty or negative.
        assert_eq!(parse_visible(Some("all"), Some("1")), listed(&["1"]));
        assert_eq!(parse_visible(None, Some("0,1,-1,3")), listed(&["0", "1"]));
        assert!(matches!(parse_visible(Some("all"), Some("")), Visible::Hidden(_)));
        assert!(matches!(parse_visible(None, Some("-1")), Visible::Hidden(_)));
        assert!(matches!(parse_visible(Some("none"), Some("0")), Visible::Hidden(_)));
        assert_eq!(parse_visible(Some("0"), Some("0,1")), listed(&["0"]));
        assert!(matches!(parse_visible(Some(" , "), None), Visible::Hidden(_)), "a list naming nothing");
    }

    #[test]
    fn plans_one_replica_per_visible_gpu() {
        let two = || Ok(2);
        let p = plan(DeviceChoice::Auto, &Visible::All, true, two).unwrap();
        assert_eq!(p.targets, vec![Target::Cuda(0), Target::Cuda(1)]);
        let p = plan(DeviceChoice::Cuda, &listed(&["3"]), true, || Ok(1)).unwrap();
        assert_eq!(p.targets, vec![Target::Cuda(0)], "indices are renumbered inside the container");
        let p = plan(DeviceChoice::Auto, &listed(&["0"]), true, two).unwrap();
        assert_eq!(p.targets.len(), 1);
        assert_eq!(plan(DeviceChoice::Cpu, &Visible::All, true, two).unwrap().targets, vec![Target::Cpu]);
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_cuda_fails_clearly() {
        // A CPU build asked for GPUs: the CPU, with a warning.
        let p = plan(DeviceChoice::Auto, &Visible::All, false, || unreachable!()).unwrap();
        assert_eq!(p.targets, vec![Target::Cpu]);
        assert!(p.warning.unwrap().contains("built without CUDA"));
        // A CPU build with nothing asked: the CPU, quietly.
        assert_eq!(plan(DeviceChoice::Auto, &Visible::Unrestricted, false, || unreachable!()).unwrap().warning, None);
        // No driver: auto warns, cuda fails.
        let no_driver = || Err("CUDA driver: libcuda.so.1 not found".to_string());
        let p = plan(DeviceChoice::Auto, &Visible::Unrestricted, true, no_driver).unwrap();
        assert_eq!(p.targets, vec![Target::Cpu]);
        assert!(p.warning.unwrap().contains("no usable GPU"));
        let e = plan(DeviceChoice::Cuda, &Visible::Unrestricted, true, no_driver).unwrap_err();
        assert!(e.to_string().contains("no usable GPU"), "{e}");
        let e = plan(DeviceChoice::Cuda, &Visible::Unrestricted, false, || unreachable!()).unwrap_err();
        assert!(e.to_string().contains("built without CUDA"), "{e}");
        let e = plan(DeviceChoice::Cuda, &Visible::Hidden("NVIDIA_VISIBLE_DEVICES=none".into()), true, || Ok(4))
            .unwrap_err();
        assert!(e.to_string().contains("NVIDIA_VISIBLE_DEVICES=none"), "{e}");
        let e = plan(DeviceChoice::Cuda, &Visible::All, true, || Ok(0)).unwrap_err();
        assert!(e.to_string().contains("no GPU"), "{e}");
    }

    #[test]
    fn placements_pin_models_to_some_gpus() {
        let p: Vec<Placement> = ["embedder=0", "llm=1, 2,1"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(p[1], Placement { model: "llm".into(), gpus: vec![1, 2] });
        assert_eq!(place("embedder", 3, true, &p), Ok(vec![0]));
        assert_eq!(place("llm", 3, true, &p), Ok(vec![1, 2]));
        assert_eq!(place("other", 3, true, &p), Ok(vec![0, 1, 2]));
        // On the CPU there is one device; pins do not apply.
        assert_eq!(place("llm", 1, false, &p), Ok(vec![0]));
        assert_eq!(place("llm", 2, true, &p), Err("--place llm=2: only 2 GPU(s) are visible (indices 0 to 1)".into()));
        for bad in ["llm", "=0", "llm=", "llm=a"] {
            let err = bad.parse::<Placement>().unwrap_err();
            assert!(err.starts_with(&format!("--place {bad:?}")), "{err}");
        }
    }

    #[test]
    fn the_gpu_kv_budget_is_what_is_free_beyond_the_share_kept_back() {
        let gib = 1u64 << 30;
        // 80 GiB card, 60 GiB free after the weights, 90%: 8 GiB kept back, 52 GiB for the cache.
        assert_eq!(gpu_kv_tokens(60 * gib, 80 * gib, 0.9, 1 << 20), 52 * 1024);
        // Less free than the share kept back: nothing.
        assert_eq!(gpu_kv_tokens(4 * gib, 80 * gib, 0.9, 1 << 20), 0);
        assert_eq!(gpu_kv_tokens(80 * gib, 80 * gib, 1.0, gib), 80);
        assert_eq!(device_memory(&Device::Cpu), None);
    }
}
