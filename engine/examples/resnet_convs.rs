//! Where ResNet-18's convolution time goes: every distinct convolution of ResNet-18 with the
//! small-input stem (1x28x28 input, 3x3 stride-1 stem, no max-pool, full width) at one batch
//! size, its forward and backward (input and weight gradients, as in a training step) timed on
//! the raw CPU kernels, multiplied by how many times the network uses it. Compare with
//! `python3 scripts/reference/torch_resnet_convs.py` (the same shapes in PyTorch).
//!
//!     cargo run --release -p recycle-engine --example resnet_convs -- [batch] [reps]

use std::time::Instant;

use recycle_engine::backend::conv::{conv2d_backward_cpu, conv2d_forward_cpu};
use recycle_engine::backend::{Conv2dGeometry, Conv2dOptions};
use recycle_engine::{DType, Device, Tensor};

/// (in channels, out channels, kernel, stride, input size, uses in the network)
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(128);
    let reps = args.get(1).copied().unwrap_or(5);
    let (mut fwd_total, mut bwd_total) = (0.0, 0.0);
    println!("| conv | uses | fwd ms | bwd ms | fwd GFLOP/s | bwd GFLOP/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, &(c, o, k, s, hw, uses)) in LAYERS.iter().enumerate() {
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
        let x = randn(&[n, c, hw, hw], 1);
        let w = randn(&[o, c, k, k], 2);
        let dy = randn(&[n, o, g.oh, g.ow], 3);
        let mut out = vec![0f32; n * o * g.pixels()];
        // The stem's input is data: no input gradient.
        let need = [i > 0, true, false];
        let (mut tf, mut tb) = (Vec::new(), Vec::new());
        for r in 0..reps + 1 {
            let t0 = Instant::now();
            conv2d_forward_cpu(&x, &w, None, &g, &mut out).unwrap();
            let t1 = Instant::now();
            let grads = conv2d_backward_cpu(&x, &w, &dy, &g, need).unwrap();
            let t2 = Instant::now();
            std::hint::black_box(grads);
            if r > 0 {
                tf.push((t1 - t0).as_secs_f64() * 1e3);
                tb.push((t2 - t1).as_secs_f64() * 1e3);
            }
        }
        let (f, b) = (median(tf), median(tb));
        let flops = g.forward_flops() as f64;
        let bflops = flops * if need[0] { 2.0 } else { 1.0 };
        println!(
            "| {c}->{o} {k}x{k} s{s} {hw}x{hw} | {uses} | {f:.1} | {b:.1} | {:.0} | {:.0} |",
            flops / f / 1e6,
            bflops / b / 1e6
        );
        fwd_total += f * uses as f64;
        bwd_total += b * uses as f64;
    }
    println!("\nbatch {n}: all convolutions of one step: forward {fwd_total:.0} ms, backward {bwd_total:.0} ms");
}
