//! `sgemm` alone at the products of the two full-width CPU steps: ResNet-18 on 28x28 images
//! (batch 128, the im2col products of each 3x3 convolution of a stage: forward, input gradient
//! `dx` and weight gradient `dw`, one thread's group of images as `conv.rs` forms them) and
//! BERT-base at batch 4 x 128 positions (the linear layers' forward, `dx` and `dW`).
//! Best-of-reps GFLOP/s on rayon pools of the given sizes; with `--cpu-time` the time of a
//! product is the CPU time of the process's threads over their number (steadier than the clock
//! on a loaded machine; a thread that waits in rayon's spin loop counts as busy).
//!
//!     cargo run --release -p recycle-engine --example sgemm_shapes -- [reps] [--threads 1,2] \
//!         [--cpu-time] [--json] [--list]
//!
//! `--list` prints the shapes as JSON lines and exits: `scripts/reference/torch_sgemm_shapes.py`
//! reads them, times `torch.mm` on the same products and runs this binary beside it.

use std::time::Instant;

use recycle_engine::backend::gemm::sgemm;

/// (label, trans_a, trans_b, m, n, k) of `C[m, n] = op(A) * op(B)`.
type Shape = (&'static str, bool, bool, usize, usize, usize);

const SHAPES: &[Shape] = &[
    // ResNet-18 full width: weights [O, C*9] x columns [C*9, items*P] (items = 256 / P images).
    ("r18 64->64 @28 fwd", false, false, 64, 784, 576),
    ("r18 64->64 @28 dx", true, false, 576, 784, 64),
    ("r18 64->64 @28 dw", false, true, 576, 64, 784),
    ("r18 128->128 @14 fwd", false, false, 128, 392, 1152),
    ("r18 128->128 @14 dx", true, false, 1152, 392, 128),
    ("r18 128->128 @14 dw", false, true, 1152, 128, 392),
    ("r18 256->256 @7 fwd", false, false, 256, 294, 2304),
    ("r18 256->256 @7 dx", true, false, 2304, 294, 256),
    ("r18 256->256 @7 dw", false, true, 2304, 256, 294),
    ("r18 512->512 @4 fwd", false, false, 512, 256, 4608),
    ("r18 512->512 @4 dx", true, false, 4608, 256, 512),
    ("r18 512->512 @4 dw", false, true, 512, 4608, 256),
    // BERT-base, 512 rows: y = x W^T, dx = dy W, dW = dy^T x.
    ("bert 768->768 fwd", false, true, 512, 768, 768),
    ("bert 768->3072 fwd", false, true, 512, 3072, 768),
    ("bert 3072->768 fwd", false, true, 512, 768, 3072),
    ("bert 768->768 dx", false, false, 512, 768, 768),
    ("bert 768->3072 dx", false, false, 512, 768, 3072),
    ("bert 3072->768 dx", false, false, 512, 3072, 768),
    ("bert 768->768 dW", true, false, 768, 768, 512),
    ("bert 768->3072 dW", true, false, 3072, 768, 512),
    ("bert 3072->768 dW", true, false, 768, 3072, 512),
];

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// The CPU time of this process's threads, in seconds (`CLOCK_PROCESS_CPUTIME_ID`, exact to
/// the nanosecond where `/proc/*/schedstat` advances by scheduler ticks), or `None` where the
/// clock cannot be read.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn cpu_seconds() -> Option<f64> {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid timespec (two 64-bit fields on the 64-bit Linux targets this
    // example measures) that the call fills in.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.sec as f64 + ts.nsec as f64 * 1e-9)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn cpu_seconds() -> Option<f64> {
    None
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let cpu = args.iter().any(|a| a == "--cpu-time");
    if args.iter().any(|a| a == "--list") {
        for &(label, ta, tb, m, n, k) in SHAPES {
            println!(
                "{{\"label\":\"{label}\",\"trans_a\":{ta},\"trans_b\":{tb},\"m\":{m},\"n\":{n},\"k\":{k}}}"
            );
        }
        return;
    }
    let threads: Vec<usize> = match args.iter().position(|a| a == "--threads") {
        Some(i) => args
            .get(i + 1)
            .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
            .unwrap_or_default(),
        None => vec![1, 2],
    };
    let reps: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(10)
        .max(1);
    if !json {
        let clock = if cpu { "CPU time" } else { "wall clock" };
        println!("best of {reps}, {clock}; GFLOP/s at {threads:?} thread(s)");
        println!("| product | m n k | GFLOP/s |");
        println!("|---|---|---:|");
    }
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .expect("a rayon pool");
        for &(label, ta, tb, m, n, k) in SHAPES {
            let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            // Each rep runs about 0.03 s of products (at 150 GFLOP/s a core).
            let inner = ((5e9 * t as f64 / flops) as usize).clamp(1, 500);
            let best = pool.install(|| {
                sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c).expect("sgemm");
                (0..reps)
                    .map(|_| {
                        let (t0, c0) = (Instant::now(), cpu.then(cpu_seconds).flatten());
                        for _ in 0..inner {
                            sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c).expect("sgemm");
                        }
                        let spent = match (c0, cpu.then(cpu_seconds).flatten()) {
                            (Some(c0), Some(c1)) => (c1 - c0) / t as f64,
                            _ => t0.elapsed().as_secs_f64(),
                        };
                        spent / inner as f64
                    })
                    .fold(f64::INFINITY, f64::min)
            });
            let gflops = flops / best / 1e9;
            if json {
                println!("{{\"label\":\"{label}\",\"threads\":{t},\"gflops\":{gflops:.2}}}");
            } else {
                println!("| {label} ({t} thr) | {m} {n} {k} | {gflops:.0} |");
            }
        }
    }
}
