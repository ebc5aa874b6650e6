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

    /// A CUDA device, or an error saying what is missing: no CUDA backend in this build, no
    /// NVIDIA driver (`libcuda.so.1`), a driver older than CUDA 13.0, no GPU `ordinal`, a GPU
    /// the kernels have no image for, or a build without kernels. Never a panic. The first
    /// successful call makes the device's context (streams, memory pool); later calls reuse it.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        crate::cuda::device_info(ordinal).map(|_| Device::Cuda(ordinal))
    }

    pub fn is_cpu(self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ordinal no machine has, so that these tests hold with or without a driver (a GPU, or
    /// the mock CUDA on the library path).
    pub(crate) const MISSING_GPU: usize = 4096;

    /// Without the feature, without an NVIDIA driver, or past the GPUs there are, asking for a
    /// GPU is an error that says what is missing, and nothing panics.
    #[test]
    fn cuda_without_a_gpu_is_an_error_naming_what_is_missing() {
        let name = format!("cuda:{MISSING_GPU}");
        for r in [Device::cuda(MISSING_GPU), Device::parse(&name)] {
            let e = r.unwrap_err().to_string();
            if cfg!(feature = "cuda") {
                if e.contains("no NVIDIA driver found") {
                    assert!(e.contains("libcuda.so.1 not loadable"), "{e}");
                }
            } else {
                assert!(
                    e.contains("no CUDA backend") && e.contains("--features cuda"),
                    "{e}"
                );
            }
            assert!(e.contains(&name), "{e}");
        }
        // `cuda` alone is cuda:0: where that fails, the error names it.
        if let Err(e) = Device::parse("cuda") {
            assert!(e.to_string().contains("cuda:0"), "{e}");
        }
        assert!(Device::parse("cuda:x").is_err());
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    }

    #[test]
    fn tensors_cannot_be_made_on_a_missing_gpu() {
        use crate::{DType, Tensor};
        let e = Tensor::zeros(&[2], DType::F32, Device::Cuda(MISSING_GPU)).unwrap_err();
        assert!(e.to_string().contains("Tensor::zeros"), "{e}");
        let t = Tensor::f32(vec![1.0, 2.0], &[2]).unwrap();
        let e = t.to_device(Device::Cuda(MISSING_GPU)).unwrap_err();
        assert!(e.to_string().contains("Tensor::to_device"), "{e}");
        assert!(t.to_device(Device::Cpu).unwrap().same_storage(&t));
    }
}
