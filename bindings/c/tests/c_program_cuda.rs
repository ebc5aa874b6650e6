//! Compiles `tests/test_cuda.c` against `include/recycle.h` and `librecycle_c.so` and runs it:
//! a tiny recipe trained through the C ABI on `cuda:0` and on the CPU, each step's loss
//! compared there; here, the final weights, as a relative L2 error per tensor within ten times
//! gpu-check's one-step f32 tolerance on updated parameters
//! (`recycle::gpu_check::F32_STEP_TOLERANCES`). Not element by element, and looser than one
//! step: over the run's four steps the libraries' summation orders compound, most in the
//! BatchNorm biases, whose gradients are sums that nearly cancel (on the mock CUDA single
//! elements moved by up to 1.3e-2 of themselves, whole tensors by up to 1.2e-3).
//!
//! With the library built with the `cuda` feature and a driver on the loader's path (CI runs
//! `cargo test -p recycle-c --features cuda --test c_program_cuda` with the mock CUDA's folder
//! in `LD_LIBRARY_PATH` and `RECYCLE_EXPECT_CUDA=1`) the program trains on both devices.
//! Without them it must report, before writing anything, why `cuda:0` does not open; and
//! under `RECYCLE_EXPECT_CUDA=1` that fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use recycle::data::sources::FASHION_MNIST;
use recycle::data::test_support::fixture_data;
use recycle::engine::{checkpoint, DType};
use recycle::gpu_check::{rel_l2_err, F32_STEP_TOLERANCES};

/// The directory holding `librecycle_c.so` built for this test (`target/<profile>`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps.parent().unwrap(), deps] {
        if dir.join("librecycle_c.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "librecycle_c.so not found next to {}: build it with `cargo build -p recycle-c`",
        exe.display()
    );
}

/// The f32 tensors of a checkpoint, by name, as f32 values.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    checkpoint::load(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .tensors
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F32)
        .map(|(name, t)| (name.clone(), t.to_vec_f32().unwrap()))
        .collect()
}

#[test]
#[cfg(target_os = "linux")]
fn c_program_trains_on_cuda_like_the_cpu() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let work = std::env::temp_dir().join(format!("recycle-c-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let exe = work.join("test_cuda");
    let status = Command::new(&cc)
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
        ])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/test_cuda.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lrecycle_c", "-lm"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling test_cuda.c failed");
    let (images, _) = fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let runs = work.join("runs");
    let out = Command::new(&exe)
        .arg(&runs)
        .env(FASHION_MNIST.dir_env, images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("== test_cuda\n{stdout}");
    eprintln!("{stderr}");
    if out.status.code() == Some(77) {
        assert!(
            std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
            "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open through the C ABI: {stdout}"
        );
        assert!(
            ["no CUDA backend", "no NVIDIA driver found", "sees no GPU"]
                .iter()
                .any(|m| stdout.contains(m)),
            "{stdout}"
        );
        assert!(
            !runs.join("c-cuda").exists(),
            "a run that could not open its device wrote its directory"
        );
    } else {
        assert!(
            out.status.success(),
            "test_cuda failed:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains(", 0 failed"), "{stdout}");
        let gpu = weights(&runs.join("c-cuda/final.safetensors"));
        let cpu = weights(&runs.join("c-cpu/final.safetensors"));
        assert_eq!(gpu.len(), cpu.len());
        for ((name, g), (cname, c)) in gpu.iter().zip(&cpu) {
            assert_eq!(name, cname);
            let err = rel_l2_err(g, c);
            let tolerance = 10.0 * F32_STEP_TOLERANCES.2;
            assert!(
                err <= tolerance,
                "{name}: the final weights on cuda:0 differ from the CPU's: relative L2 error \
                 {err:.2e} > {tolerance}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
