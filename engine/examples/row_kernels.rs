//! The CPU softmax rows and the AdamW update in lanes against their scalar references, on one
//! thread: softmax forward and backward over BERT-base's attention probabilities at batch 4
//! (4 x 12 heads x 128 queries, rows of 128 keys), log-softmax over masked-MLM logits (87 rows
//! of 30,522), and one AdamW step over 8M parameters. Best of `reps` (ms) of each; the lane and
//! reference runs alternate, so their ratio holds on a loaded machine.
//!
//!     cargo run --release -p recycle-engine --example row_kernels -- [reps]

use std::time::Instant;

use recycle_engine::backend::softmax::{
    log_softmax_row_cpu, log_softmax_row_reference, softmax_backward_row_cpu,
    softmax_backward_row_reference, softmax_row_cpu, softmax_row_reference,
};
use recycle_engine::optim::adamw::adamw_update_reference;
use recycle_engine::optim::{adamw_update_cpu, AdamW};

type Rows = fn(&[f32], &mut [f32]);
type Rows2 = fn(&[f32], &[f32], &mut [f32]);

fn ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn rows(f: Rows, x: &[f32], len: usize, out: &mut [f32]) {
    for (i, o) in x.chunks(len).zip(out.chunks_mut(len)) {
        f(i, o);
    }
}

fn rows2(f: Rows2, y: &[f32], dy: &[f32], len: usize, dx: &mut [f32]) {
    for ((y, g), d) in y.chunks(len).zip(dy.chunks(len)).zip(dx.chunks_mut(len)) {
        f(y, g, d);
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5)
        .max(1);
    let value = |i: usize, scale: f32| ((i * 7919) % 4001) as f32 * scale / 4001.0 - scale / 2.0;
    let (att_len, att) = (128, 4 * 12 * 128 * 128);
    let scores: Vec<f32> = (0..att).map(|i| value(i, 16.0)).collect();
    let dy: Vec<f32> = (0..att).map(|i| value(i + 3, 1.0)).collect();
    let (vocab, logits_len) = (30_522, 87 * 30_522);
    let logits: Vec<f32> = (0..logits_len).map(|i| value(i, 30.0)).collect();
    let mut out = vec![0f32; att];
    let mut probs = vec![0f32; att];
    rows(softmax_row_reference, &scores, att_len, &mut probs);
    let mut log_out = vec![0f32; logits_len];

    let n = 8 << 20;
    let opt = AdamW::torch_default(n).expect("AdamW");
    let s = opt.step_scalars(10, 1e-4);
    let grad: Vec<f32> = (0..n).map(|i| value(i, 0.02)).collect();
    let (mut p, mut m, mut v) = (
        (0..n).map(|i| value(i + 1, 0.1)).collect::<Vec<f32>>(),
        vec![1e-3f32; n],
        vec![1e-6f32; n],
    );

    let mut t = [[f64::INFINITY; 2]; 4];
    for _ in 0..reps {
        for (lanes, fwd) in [(0, softmax_row_cpu as Rows), (1, softmax_row_reference)] {
            let e = ms(|| rows(fwd, &scores, att_len, &mut out));
            t[0][lanes] = t[0][lanes].min(e);
        }
        for (lanes, bwd) in [
            (0, softmax_backward_row_cpu as Rows2),
            (1, softmax_backward_row_reference),
        ] {
            let e = ms(|| rows2(bwd, &probs, &dy, att_len, &mut out));
            t[1][lanes] = t[1][lanes].min(e);
        }
        for (lanes, fwd) in [
            (0, log_softmax_row_cpu as Rows),
            (1, log_softmax_row_reference),
        ] {
            let e = ms(|| rows(fwd, &logits, vocab, &mut log_out));
            t[2][lanes] = t[2][lanes].min(e);
        }
        let e = ms(|| adamw_update_cpu(&mut p, &grad, &mut m, &mut v, &s).expect("sizes"));
        t[3][0] = t[3][0].min(e);
        let e = ms(|| adamw_update_reference(&mut p, &grad, &mut m, &mut v, &s));
        t[3][1] = t[3][1].min(e);
    }
    println!("best of {reps}, one thread, ms");
    println!("| kernel | lanes | reference | lanes / reference |");
    println!("|---|---:|---:|---:|");
    let names = [
        "softmax rows, 6144 x 128 (BERT-base b4 attention)",
        "softmax backward rows, 6144 x 128",
        "log-softmax rows, 87 x 30522 (masked MLM logits)",
        "AdamW step, 8M parameters",
    ];
    for (name, [lanes, reference]) in names.iter().zip(t) {
        println!(
            "| {name} | {lanes:.2} | {reference:.2} | {:.2} |",
            lanes / reference
        );
    }
}
