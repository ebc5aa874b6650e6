//! Where a tensor lives. The CPU is always there; a CUDA device is asked for by ordinal and is
//! an error, never a panic, when the build or the machine lacks it.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`, and checks that the device can be used here.
    pub fn parse(s: &str) -> Result<Device> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Ok(Device::Cpu);
        }
        let ordinal = if s.eq_ignore_ascii_case("cuda") {
            0
        } else if let Some(n) = s.strip_prefix("cuda:") {
            n.parse::<usize>().map_err(|_| {
                Error::invalid(
                    "Device::parse",
                    format!("`{s}`: the ordinal after `cuda:` must be a number, e.g. cuda:0"),
                )
            })?
        } else {
            return Err(Error::invalid(
                "Device::parse",
                format!("unknown device `{s}`: use cpu, cuda or cuda:N"),
            ));
        };
        Device::cuda(ordinal)
    }

    /// A CUDA device, or an error saying what is missing.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Err(Error::Device(format!(
            "cuda:{ordinal} was requested, but this build of recycle-engine has no CUDA backend; \
             use the CPU (`cpu`), or rebuild with `--features cuda` on a machine with an NVIDIA driver"
        )))
    }

    pub fn is_cpu(self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
