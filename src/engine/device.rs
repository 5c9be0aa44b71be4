//! Device choice, in one place and logged: the CPU, or a CUDA GPU when this build and machine have one.
use candle_core::Device;
use tracing::{info, warn};

use super::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when this build has it and a GPU is visible, else the CPU (with a warning).
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU; start-up fails when this build or this machine has none.
    Cuda,
}

/// Picks the device the models run on.
pub fn select_device(choice: DeviceChoice) -> Result<Device, EngineError> {
    match choice {
        DeviceChoice::Cpu => {
            info!("models run on the CPU");
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda => cuda(0),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                match cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(err) => warn!(error = %err, "no usable GPU; falling back to the CPU"),
                }
            }
            info!("models run on the CPU");
            Ok(Device::Cpu)
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device, EngineError> {
    let device = Device::new_cuda(ordinal).map_err(|e| EngineError::Device(format!("CUDA device {ordinal}: {e}")))?;
    info!(ordinal, "models run on CUDA");
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device, EngineError> {
    Err(EngineError::Device(
        "this omnibus binary was built without CUDA; build with `cargo build --release --features cuda` on a \
         GPU host, or use --device cpu"
            .into(),
    ))
}

/// A short name for logs and ListModels.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
