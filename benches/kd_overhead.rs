//! `kd_overhead`: the per-step cost of distillation against a plain step (see `recycle::bench`).
//!
//! For each model, first the interleaved measurement `recycle bench` prints (medians and ratios
//! to the plain step, the numbers to compare with the PyTorch peer), then one criterion
//! benchmark per variant. Models default to the CPU-sized ones, `resnet18-fmnist-small` and
//! `bert-tiny`; `RECYCLE_BENCH_MODELS=resnet18-fmnist,bert-tiny` picks others (the full-width
//! ResNet takes seconds per step on two cores) and `RECYCLE_BENCH_ITERS` the interleaved
//! rounds (default 10).
//!
//!     cargo bench --bench kd_overhead
//!     cargo bench --bench kd_overhead -- bert-tiny/kd-kl

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use recycle::bench::{BenchSpec, KdBench, Variant};

fn kd_overhead(c: &mut Criterion) {
    // As the `recycle` binary does: reuse freed step buffers (engine::memory).
    recycle::engine::memory::keep_freed_memory();
    let models = std::env::var("RECYCLE_BENCH_MODELS")
        .unwrap_or_else(|_| "resnet18-fmnist-small,bert-tiny".to_string());
    let iters = std::env::var("RECYCLE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for model in models.split(',').filter(|m| !m.is_empty()) {
        let spec = BenchSpec::new(model);
        let mut bench = KdBench::new(&spec).unwrap_or_else(|e| panic!("{model}: {e}"));
        let report = bench
            .measure(&Variant::ALL, iters, spec.warmup)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        println!("\n{}", report.to_markdown());
        println!("{}\n", report.to_json());

        let mut group = c.benchmark_group(model);
        // Steps take 10-300 ms: flat sampling (every sample the same number of steps) and a
        // 5 s window keep 10 samples within reach.
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(5));
        for v in Variant::ALL {
            group.bench_function(v.name(), |b| {
                b.iter(|| bench.run(v).unwrap_or_else(|e| panic!("{model}: {e}")))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, kd_overhead);
criterion_main!(benches);
