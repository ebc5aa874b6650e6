//! The AVX-512 kernel against the `gemm` crate on the products a ResNet-18 step and a BERT-tiny
//! step run (and square ones), alternating the two paths shape by shape so that load on a
//! shared machine hits both alike. Prints best-of-reps GFLOP/s of each and their ratio.
//!
//!     cargo run --release -p recycle-engine --example sgemm_paths -- [reps]

use std::time::Instant;

use recycle_engine::backend::gemm::{avx512_active, set_avx512, sgemm, sgemm_serial};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    if !avx512_active() {
        println!("no AVX-512F on this CPU: only the gemm crate runs");
        return;
    }
    // (label, threaded, trans_a, trans_b, m, n, k)
    let shapes: &[(&str, bool, bool, bool, usize, usize, usize)] = &[
        ("square 1024", true, false, false, 1024, 1024, 1024),
        ("square 2048", true, false, false, 2048, 2048, 2048),
        (
            "conv fwd 64->64 @28 (per item)",
            false,
            false,
            false,
            64,
            784,
            576,
        ),
        ("conv dW 64->64 @28", false, false, true, 64, 576, 784),
        ("conv dcols 64->64 @28", false, true, false, 576, 784, 64),
        ("conv fwd 256->256 @7", false, false, false, 256, 49, 2304),
        ("conv dW 256->256 @7", false, false, true, 256, 2304, 49),
        ("conv dcols 256->256 @7", false, true, false, 2304, 49, 256),
        ("conv fwd 512->512 @4", false, false, false, 512, 16, 4608),
        ("conv dW 512->512 @4", false, false, true, 512, 4608, 16),
        ("conv dcols 512->512 @4", false, true, false, 4608, 16, 512),
        (
            "bert qkv fwd 4096x128x128",
            true,
            false,
            true,
            4096,
            128,
            128,
        ),
        (
            "bert ffn fwd 4096x512x128",
            true,
            false,
            true,
            4096,
            512,
            128,
        ),
        (
            "bert ffn dW 512x128x4096",
            true,
            true,
            false,
            512,
            128,
            4096,
        ),
        (
            "bert decoder fwd 611x30522x128",
            true,
            false,
            true,
            611,
            30522,
            128,
        ),
        (
            "bert decoder dW 30522x128x611",
            true,
            true,
            false,
            30522,
            128,
            611,
        ),
    ];
    println!("| product | m n k | gemm crate GFLOP/s | AVX-512 GFLOP/s | ratio |");
    println!("|---|---|---:|---:|---:|");
    for &(label, threaded, ta, tb, m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let inner = ((2e8 / flops) as usize).clamp(1, 200);
        let mut best = [f64::INFINITY; 2];
        for _ in 0..reps {
            for (path, slot) in best.iter_mut().enumerate() {
                set_avx512(path == 1);
                let t0 = Instant::now();
                for _ in 0..inner {
                    if threaded {
                        sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c).unwrap();
                    } else {
                        sgemm_serial(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c).unwrap();
                    }
                }
                *slot = slot.min(t0.elapsed().as_secs_f64() / inner as f64);
            }
        }
        set_avx512(true);
        let g = best.map(|t| flops / t / 1e9);
        println!(
            "| {label}{} | {m} {n} {k} | {:.0} | {:.0} | {:.2} |",
            if threaded {
                " (threaded)"
            } else {
                " (1 thread)"
            },
            g[0],
            g[1],
            g[1] / g[0]
        );
    }
}
