//! Square f32 matmul through `backend::gemm::sgemm` at 512, 1024 and 2048. Throughput is counted
//! as 2·n³ elements, so criterion's "elem/s" reads as FLOP/s. With `--features openblas` the
//! `gemm` crate path is measured in the same run (`gemm_crate/n`) for a side-by-side ratio.
//!
//! `cargo bench -p recycle-engine --bench matmul [--features openblas]`
//! Compare with `python3 scripts/reference/torch_cpu_bench.py` (same shapes, same threads).

use std::time::Duration;

use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use recycle_engine::backend::gemm;

fn data(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| recycle_engine::rng::normal_at(seed, i))
        .collect()
}

fn bench_matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for n in [512usize, 1024, 2048] {
        let a = data(n * n, 1);
        let b = data(n * n, 2);
        let mut out = vec![0f32; n * n];
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        // 2048: ten samples of a few products each instead of criterion's linear ramp, so a
        // run stays short.
        group
            .sample_size(if n >= 2048 { 10 } else { 20 })
            .sampling_mode(if n >= 2048 {
                SamplingMode::Flat
            } else {
                SamplingMode::Auto
            });
        group.bench_with_input(BenchmarkId::new("sgemm", n), &n, |bench, &n| {
            bench.iter(|| {
                gemm::sgemm(false, false, n, n, n, 1.0, &a, &b, 0.0, &mut out).unwrap();
                black_box(&out);
            })
        });
        if cfg!(feature = "openblas") {
            group.bench_with_input(BenchmarkId::new("gemm_crate", n), &n, |bench, &n| {
                bench.iter(|| {
                    gemm::sgemm_gemm_crate(false, false, n, n, n, 1.0, &a, &b, 0.0, &mut out)
                        .unwrap();
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
