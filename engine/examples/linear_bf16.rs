//! A dense layer's products in bf16 (`vdpbf16ps`, f32 accumulation) against f32 on the shapes
//! of the BERT-tiny and BERT-base steps: forward, `dx` and `dW`, each path as `linear` runs it
//! on the CPU. The f32 path is what a bf16-computing student ran before its backward moved to
//! bf16 products: the bf16 weights widened to f32, then `sgemm`. The two paths alternate shape
//! by shape so that load on a shared machine hits both alike; prints the best of `reps` (ms)
//! of each and their ratio.
//!
//!     cargo run --release -p recycle-engine --example linear_bf16 -- [reps]

use std::time::Instant;

use half::bf16;
use recycle_engine::backend::gemm::{bf16_products_active, Half};
use recycle_engine::backend::matmul::{linear_backward_cpu, linear_forward_cpu};
use recycle_engine::backend::matmul_bf16::{linear_backward_bf16_cpu, linear_forward_bf16_cpu};

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    if !bf16_products_active() {
        println!("no AVX512_BF16 on this CPU (or RECYCLE_BF16_PRODUCTS=0): nothing to compare");
        return;
    }
    // (label, rows, in_f, out_f)
    let shapes = [
        ("bert-tiny b32 qkv/out 128->128", 4096, 128, 128),
        ("bert-tiny b32 ffn 128->512", 4096, 128, 512),
        ("bert-tiny b32 ffn 512->128", 4096, 512, 128),
        ("bert-base b4 qkv/out 768->768", 512, 768, 768),
        ("bert-base b4 ffn 768->3072", 512, 768, 3072),
        ("bert-base b4 ffn 3072->768", 512, 3072, 768),
        ("bert-base b4 head 83x768->30522", 83, 768, 30522),
    ];
    println!("| linear (rows, in -> out) | fwd f32 ms | fwd bf16 ms | bwd f32 ms | bwd bf16 ms | bwd bf16 / f32 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, rows, in_f, out_f) in shapes {
        let x = data(rows * in_f, 1);
        let w16: Vec<bf16> = data(out_f * in_f, 2)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let g = data(rows * out_f, 3);
        let mut out = vec![0f32; rows * out_f];
        let widen = || -> Vec<f32> { w16.iter().map(|v| v.to_f32()).collect() };
        let mut t = [f64::INFINITY; 4];
        for _ in 0..reps {
            t[0] = t[0].min(best(1, || {
                linear_forward_cpu(&x, &widen(), None, rows, in_f, out_f, &mut out).unwrap()
            }));
            t[1] = t[1].min(best(1, || {
                linear_forward_bf16_cpu(Half::F32(&x), &w16, None, rows, in_f, out_f, &mut out)
                    .unwrap()
            }));
            t[2] = t[2].min(best(1, || {
                let need = [true, true, false];
                linear_backward_cpu(&x, &widen(), &g, rows, in_f, out_f, need).unwrap();
            }));
            t[3] = t[3].min(best(1, || {
                let need = [true, true, false];
                let x = Half::F32(&x);
                linear_backward_bf16_cpu(x, &w16, &g, rows, in_f, out_f, need).unwrap();
            }));
        }
        println!(
            "| {label} ({rows}, {in_f} -> {out_f}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            t[0],
            t[1],
            t[2],
            t[3],
            t[3] / t[2]
        );
    }
}
