//! conv2d forward + backward at ResNet's CPU-sized shape: batch 128, 64 -> 64 channels, 3x3,
//! stride 1, padding 1, 28x28. Throughput counts 2·multiply-adds (forward: 2·N·O·C·9·28·28;
//! forward + backward with input, weight and bias gradients: 3x that), so "elem/s" reads as
//! FLOP/s. The `conv2d_schedule` group times the lowering schedules of `backend::conv` on the raw
//! kernels, so the choice `ConvSchedule::auto` makes (`PerItem` here) is measured, not assumed.
//! Flat sampling, 10 samples: a run takes about half a minute.
//!
//! `cargo bench -p recycle-engine --bench conv2d [--features openblas]`
//! Compare with `python3 scripts/reference/torch_cpu_bench.py` (same shape, same threads).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use recycle_engine::backend::conv::{
    conv2d_backward_cpu_with, conv2d_forward_cpu_with, ConvSchedule,
};
use recycle_engine::backend::{Conv2dGeometry, Conv2dOptions};
use recycle_engine::ops::conv::conv2d;
use recycle_engine::{DType, Device, Tape, Tensor};

const X: [usize; 4] = [128, 64, 28, 28];
const W: [usize; 4] = [64, 64, 3, 3];
const OPTS: Conv2dOptions = Conv2dOptions {
    stride: 1,
    padding: 1,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
}

fn bench_conv2d(c: &mut Criterion) {
    let g = Conv2dGeometry::new(&X, &W, OPTS).unwrap();
    let (x, w, b) = (randn(&X, 1), randn(&W, 2), randn(&[W[0]], 3));
    let dy = randn(&[g.n, g.o, g.oh, g.ow], 4);

    let mut group = c.benchmark_group("conv2d");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(g.forward_flops()));
    group.bench_function("fwd", |bench| {
        bench.iter(|| {
            let tape = Tape::inference();
            let y = conv2d(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(w.clone()),
                Some(&tape.constant(b.clone())),
                OPTS,
            )
            .unwrap();
            black_box(y);
        })
    });
    group.throughput(Throughput::Elements(3 * g.forward_flops()));
    group.bench_function("fwd_bwd", |bench| {
        bench.iter(|| {
            let tape = Tape::recording();
            let (xv, wv, bv) = (
                tape.watch(x.clone()),
                tape.watch(w.clone()),
                tape.watch(b.clone()),
            );
            let y = conv2d(&tape, &xv, &wv, Some(&bv), OPTS).unwrap();
            black_box(tape.backward_with(&y, dy.clone()).unwrap());
        })
    });
    group.finish();

    let mut group = c.benchmark_group("conv2d_schedule");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(3 * g.forward_flops()));
    let (xs, ws, bs, dys) = (
        x.to_vec_f32().unwrap(),
        w.to_vec_f32().unwrap(),
        b.to_vec_f32().unwrap(),
        dy.to_vec_f32().unwrap(),
    );
    let mut out = vec![0f32; dys.len()];
    let schedules = [
        ("per_item", ConvSchedule::PerItem),
        ("batched_1", ConvSchedule::Batched { items: 1 }),
        ("batched_8", ConvSchedule::Batched { items: 8 }),
    ];
    for (name, sched) in schedules {
        group.bench_function(format!("fwd_bwd_{name}"), |bench| {
            bench.iter(|| {
                conv2d_forward_cpu_with(&xs, &ws, Some(&bs), &g, &mut out, sched).unwrap();
                black_box(conv2d_backward_cpu_with(&xs, &ws, &dys, &g, [true; 3], sched).unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_conv2d);
criterion_main!(benches);
