//! GELU's CPU kernels against their f64 reference on a BERT-tiny FFN activation (32 x 128
//! positions x 512 features): forward and backward, best of `reps` (ms) of each. Under
//! `valgrind --tool=callgrind` (which hides AVX-512, so the baseline copy runs) the instruction
//! counts of `gelu_forward_cpu` and `gelu_forward_ref` compare the two without the clock.
//!
//!     cargo run --release -p recycle-engine --example gelu_paths -- [reps]

use std::time::Instant;

use recycle_engine::backend::activation::{
    gelu_backward_cpu, gelu_backward_ref, gelu_forward_cpu, gelu_forward_ref,
};

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
    let n = 32 * 128 * 512;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 4001) as f32 * 2e-3 - 4.0)
        .collect();
    let g: Vec<f32> = x.iter().map(|v| 1.0 - 0.1 * v).collect();
    let mut t = [f64::INFINITY; 4];
    for _ in 0..reps {
        t[0] = t[0].min(best(1, || drop(gelu_forward_cpu(&x))));
        t[1] = t[1].min(best(1, || drop(gelu_forward_ref(&x))));
        t[2] = t[2].min(best(1, || drop(gelu_backward_cpu(&x, &g))));
        t[3] = t[3].min(best(1, || drop(gelu_backward_ref(&x, &g))));
    }
    let [fwd, fwd_ref, bwd, bwd_ref] = t;
    println!("| GELU over {n} values | kernel ms | f64 reference ms | kernel / reference |");
    println!("|---|---:|---:|---:|");
    println!(
        "| forward | {fwd:.2} | {fwd_ref:.2} | {:.2} |",
        fwd / fwd_ref
    );
    println!(
        "| backward | {bwd:.2} | {bwd_ref:.2} | {:.2} |",
        bwd / bwd_ref
    );
}
