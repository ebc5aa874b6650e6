//! Time of typical launches on the host simulator: an elementwise add over 1M floats (256-thread
//! blocks, grid-stride), a softmax of 64 rows of 4096 (1024-thread blocks, shuffles and
//! barriers), and a softmax of 1024 short rows. Run with
//! `RECYCLE_REQUIRE_NVCC=1 cargo run --release -p recycle-kernels --example sim_speed`.

use std::time::Instant;

use recycle_kernels::call::{KernelCall, Ptr};
use recycle_kernels::launch;
use recycle_kernels::launchers as k;
use recycle_kernels::sim::{HostSim, SimBuffer};

/// A buffer as a kernel's pointer argument.
fn ptr<T>(b: &SimBuffer) -> Ptr<T> {
    Ptr::new(b.ptr())
}

fn time(sim: &HostSim, label: &str, call: &KernelCall) {
    // SAFETY: the callers pass live buffers of the launch's size.
    let run = || unsafe { sim.run(call) }.unwrap_or_else(|e| panic!("{e}"));
    run();
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        run();
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let cfg = &call.config;
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
    let call = k::add::<f32>(cfg, ptr(&a), ptr(&b), ptr(&out), n as u64);
    time(sim, "add_f32, 1M elements", &call);

    for (rows, cols) in [(64usize, 4096usize), (1024, 128)] {
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 97) as f32 * 0.01).collect();
        let (bx, by) = (
            SimBuffer::from_slice(&x),
            SimBuffer::zeros::<f32>(rows * cols),
        );
        let cfg = launch::rows("softmax_fwd_f32", rows as u64, cols as u64)
            .expect("a valid shape")
            .expect("a non-empty launch");
        let call = k::softmax_fwd::<f32>(cfg, ptr(&bx), ptr(&by), cols as u32);
        time(
            sim,
            &format!("softmax_fwd_f32, {rows} rows of {cols}"),
            &call,
        );
    }
}
