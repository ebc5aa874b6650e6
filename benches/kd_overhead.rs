//! `kd_overhead`: the per-step cost of distillation against a plain step (see `recycle::bench`).
//!
//! For each model, first the interleaved measurement `recycle bench` prints (medians and ratios
//! to the plain step, the numbers to compare with the PyTorch peer; also each variant's peak
//! memory: device memory on a GPU, heap bytes on the CPU), then one criterion benchmark per variant. Environment:
//!
//! - `RECYCLE_BENCH_DEVICE`: `cpu` (default) or `cuda:N`. On a GPU every criterion iteration
//!   ends with a device synchronisation, so it times the whole step, not its queuing.
//! - `RECYCLE_BENCH_MODELS`: comma-separated configurations. Default on the CPU the CPU-sized
//!   `resnet18-fmnist-small,bert-tiny` (the full-width ResNet takes seconds per step on two
//!   cores); on a GPU the paper's `resnet50-imagenet,bert-base` (bf16).
//! - `RECYCLE_BENCH_ITERS`: the interleaved rounds (default 10).
//!
//! ```sh
//! cargo bench --bench kd_overhead
//! cargo bench --bench kd_overhead -- bert-tiny/kd-kl
//! RECYCLE_BENCH_DEVICE=cuda:0 cargo bench --features cuda --bench kd_overhead
//! ```
//!
//! GPU figures and what has run on a GPU: docs/benchmarks.md and docs/cuda.md.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use recycle::bench::{BenchSpec, KdBench, Variant};
use recycle::engine::{cuda, Device};

/// Counts heap bytes: the interleaved measurement then reports each variant's peak on the CPU
/// too (see `recycle::bench`).
#[global_allocator]
static HEAP: recycle::engine::memory::CountingAllocator =
    recycle::engine::memory::CountingAllocator;

fn kd_overhead(c: &mut Criterion) {
    // As the `recycle` binary does: reuse freed step buffers (engine::memory).
    recycle::engine::memory::keep_freed_memory();
    let device = std::env::var("RECYCLE_BENCH_DEVICE").map_or(Ok(Device::Cpu), |d| {
        Device::parse(&d).map_err(|e| format!("RECYCLE_BENCH_DEVICE={d}: {e}"))
    });
    let device = device.unwrap_or_else(|e| panic!("{e}"));
    let default_models = match device {
        Device::Cpu => "resnet18-fmnist-small,bert-tiny",
        Device::Cuda(_) => "resnet50-imagenet,bert-base",
    };
    let models =
        std::env::var("RECYCLE_BENCH_MODELS").unwrap_or_else(|_| default_models.to_string());
    let iters = std::env::var("RECYCLE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for model in models.split(',').filter(|m| !m.is_empty()) {
        let mut spec = BenchSpec::new(model);
        spec.device = device;
        let mut bench = KdBench::new(&spec).unwrap_or_else(|e| panic!("{model}: {e}"));
        let report = bench
            .measure(&Variant::ALL, iters, spec.warmup)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        println!("\n{}", report.to_markdown());
        println!("{}\n", report.to_json());

        // Criterion ids: `bert-tiny/kd-kl` on the CPU (as before), `bert-base-cuda0/kd-kl`.
        let group_name = match device {
            Device::Cpu => model.to_string(),
            Device::Cuda(n) => format!("{model}-cuda{n}"),
        };
        let mut group = c.benchmark_group(group_name);
        // Steps take 10-300 ms: flat sampling (every sample the same number of steps) and a
        // 5 s window keep 10 samples within reach.
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(5));
        for v in Variant::ALL {
            group.bench_function(v.name(), |b| {
                b.iter(|| {
                    bench.run(v).unwrap_or_else(|e| panic!("{model}: {e}"));
                    // A GPU step returns once queued: wait for it (a no-op on the CPU).
                    cuda::synchronize(device).unwrap_or_else(|e| panic!("{model}: {e}"));
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, kd_overhead);
criterion_main!(benches);
