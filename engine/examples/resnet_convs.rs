//! Where ResNet-18's convolution time goes: every distinct convolution of ResNet-18 with the
//! small-input stem (1x28x28 input, 3x3 stride-1 stem, no max-pool) at one batch size and
//! width multiplier, timed on the raw CPU kernels pass by pass: the forward, the input gradient
//! (`dx`, none for the stem: its input is data) and the weight gradient (`dw`), as a training
//! step runs them (no bias: BatchNorm follows every convolution). Medians over `reps` rounds.
//!
//!     cargo run --release -p recycle-engine --example resnet_convs -- [batch] [reps] [width] \
//!         [--cpu-time] [--json] [--only=TEXT]
//!
//! `--cpu-time` times CPU time instead of the clock (see `time_ms`). Prints a table and, with
//! `--json`, one JSON line per convolution instead (milliseconds),
//! which `scripts/reference/torch_resnet_convs.py --recycle BINARY` reads to set PyTorch's
//! times for the same shapes beside these, in one run. Threads: `RAYON_NUM_THREADS`.

use std::time::Instant;

use recycle_engine::backend::conv::{conv2d_backward_cpu, conv2d_forward_cpu};
use recycle_engine::backend::{Conv2dGeometry, Conv2dOptions};
use recycle_engine::{DType, Device, Tensor};

/// At full width: (in channels, out channels, kernel, stride, input size, uses in the network).
pub const LAYERS: [(usize, usize, usize, usize, usize, usize); 11] = [
    (1, 64, 3, 1, 28, 1),
    (64, 64, 3, 1, 28, 4),
    (64, 128, 3, 2, 28, 1),
    (64, 128, 1, 2, 28, 1),
    (128, 128, 3, 1, 14, 3),
    (128, 256, 3, 2, 14, 1),
    (128, 256, 1, 2, 14, 1),
    (256, 256, 3, 1, 7, 3),
    (256, 512, 3, 2, 7, 1),
    (256, 512, 1, 2, 7, 1),
    (512, 512, 3, 1, 4, 3),
];

/// A channel count at width multiplier `width`, rounded as the ResNet model rounds it.
fn scaled(c: usize, width: f64) -> usize {
    if c == 1 {
        return 1;
    }
    ((c as f64 * width).round() as usize).max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The CPU time this process's threads have run, in milliseconds (Linux: the sum of
/// `/proc/self/task/*/schedstat`), or `None` where that cannot be read.
fn cpu_ms() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e6)
}

/// The median time in milliseconds of `f` over `reps` runs, after one untimed run: CPU time
/// when `cpu` (steadier than the clock on a loaded machine, and equal to it on one thread that
/// is never descheduled), wall-clock time otherwise.
fn time_ms(reps: usize, cpu: bool, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps.max(1))
            .map(|_| {
                let (t, c) = (Instant::now(), if cpu { cpu_ms() } else { None });
                f();
                match (c, cpu_ms().filter(|_| cpu)) {
                    (Some(c0), Some(c1)) => c1 - c0,
                    _ => t.elapsed().as_secs_f64() * 1e3,
                }
            })
            .collect(),
    )
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let cpu = std::env::args().any(|a| a == "--cpu-time");
    // `--only=TEXT`: the convolutions whose name (as printed) contains TEXT.
    let only = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_string));
    let nums: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = nums.first().and_then(|a| a.parse().ok()).unwrap_or(128);
    let reps: usize = nums.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let width: f64 = nums.get(2).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let threads = rayon::current_num_threads();
    let mut totals = [0.0f64; 3];
    if !json {
        let clock = if cpu { "CPU time" } else { "wall clock" };
        println!("batch {n}, width {width}, {threads} threads, {clock}, medians of {reps}");
        println!(
            "| conv | uses | fwd ms | dx ms | dw ms | fwd GFLOP/s | dx GFLOP/s | dw GFLOP/s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    }
    for (i, &(c, o, k, s, hw, uses)) in LAYERS.iter().enumerate() {
        let (c, o) = (scaled(c, width), scaled(o, width));
        let opts = Conv2dOptions {
            stride: s,
            padding: k / 2,
        };
        let g = Conv2dGeometry::new(&[n, c, hw, hw], &[o, c, k, k], opts).unwrap();
        let randn = |shape: &[usize], seed| {
            Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        let name = format!("{c}->{o} {k}x{k} s{s} {hw}x{hw}");
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let x = randn(&[n, c, hw, hw], 1);
        let w = randn(&[o, c, k, k], 2);
        let dy = randn(&[n, o, g.oh, g.ow], 3);
        let mut out = vec![0f32; n * o * g.pixels()];
        let fwd = time_ms(reps, cpu, || {
            conv2d_forward_cpu(&x, &w, None, &g, &mut out).unwrap()
        });
        let backward = |need| {
            time_ms(reps, cpu, || {
                std::hint::black_box(conv2d_backward_cpu(&x, &w, &dy, &g, need).unwrap());
            })
        };
        // The stem's input is data: no input gradient.
        let dx = if i > 0 {
            backward([true, false, false])
        } else {
            0.0
        };
        let dw = backward([false, true, false]);
        let gflops = |ms: f64| g.forward_flops() as f64 / ms / 1e6;

        if json {
            println!(
                "{{\"conv\": \"{name}\", \"uses\": {uses}, \"threads\": {threads}, \
                 \"fwd_ms\": {fwd:.4}, \"dx_ms\": {dx:.4}, \"dw_ms\": {dw:.4}}}"
            );
        } else {
            let dx_rate = if i > 0 { gflops(dx) } else { 0.0 };
            println!(
                "| {name} | {uses} | {fwd:.2} | {dx:.2} | {dw:.2} | {:.0} | {dx_rate:.0} | {:.0} |",
                gflops(fwd),
                gflops(dw)
            );
        }
        for (t, v) in totals.iter_mut().zip([fwd, dx, dw]) {
            *t += v * uses as f64;
        }
    }
    if !json {
        let [f, dx, dw] = totals;
        println!("\nall convolutions of one step: forward {f:.1} ms, dx {dx:.1} ms, dw {dw:.1} ms");
    }
}
