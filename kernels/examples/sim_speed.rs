//! Time of typical launches on the host simulator: an elementwise add over 1M floats (256-thread
//! blocks, grid-stride), a softmax of 64 rows of 4096 (1024-thread blocks, shuffles and
//! barriers), and a softmax of 1024 short rows. Run with
//! `RECYCLE_REQUIRE_NVCC=1 cargo run --release -p recycle-kernels --example sim_speed`.

use std::ffi::c_void;
use std::time::Instant;

use recycle_kernels::launch::{self, LaunchConfig};
use recycle_kernels::sim::{HostSim, SimBuffer};

fn time(sim: &HostSim, label: &str, kernel: &str, cfg: &LaunchConfig, args: &mut [u64]) {
    let mut params: Vec<*mut c_void> = args
        .iter_mut()
        .map(|a| a as *mut u64 as *mut c_void)
        .collect();
    // SAFETY: the callers pass the kernel's arguments with live buffers of the launch's size.
    let run = |p: &mut [*mut c_void]| unsafe { sim.launch(kernel, cfg, p) };
    run(&mut params).unwrap_or_else(|e| panic!("{e}"));
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        run(&mut params).unwrap_or_else(|e| panic!("{e}"));
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!(
        "{label}: {ms:.2} ms per launch (grid {:?}, block {:?})",
        cfg.grid, cfg.block
    );
}

fn main() {
    let sim = match HostSim::get() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let n = 1usize << 20;
    let a = SimBuffer::from_slice(&vec![1.5f32; n]);
    let b = SimBuffer::from_slice(&vec![0.25f32; n]);
    let out = SimBuffer::zeros::<f32>(n);
    let cfg = launch::elementwise(n as u64).expect("a non-empty launch");
    let mut args = [a.ptr(), b.ptr(), out.ptr(), n as u64];
    time(sim, "add_f32, 1M elements", "add_f32", &cfg, &mut args);

    for (rows, cols) in [(64usize, 4096usize), (1024, 128)] {
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 97) as f32 * 0.01).collect();
        let (bx, by) = (
            SimBuffer::from_slice(&x),
            SimBuffer::zeros::<f32>(rows * cols),
        );
        let cfg = launch::rows("softmax_fwd_f32", rows as u64, cols as u64)
            .expect("a valid shape")
            .expect("a non-empty launch");
        // The u32 `cols` is read from the low bytes of its 8-byte slot (little-endian).
        let mut args = [bx.ptr(), by.ptr(), cols as u64];
        let label = format!("softmax_fwd_f32, {rows} rows of {cols}");
        time(sim, &label, "softmax_fwd_f32", &cfg, &mut args);
    }
}
