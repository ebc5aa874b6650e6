//! `gemm_bf16` (bf16 products, f32 accumulation) against `sgemm` at the products of the CPU
//! steps, each in the operand form its caller passes: ResNet-18 on 28x28 images (batch 128,
//! one thread's group of images), ResNet-50 at 224x224 (one image), BERT-base at 4 x 128
//! positions. For each shape both run on one rayon thread, alternating rep by rep; the time
//! of a product is the process's CPU time (steadier than the clock on a loaded machine).
//! Prints GFLOP/s of each and their ratio.
//!
//!     cargo run --release -p recycle-engine --example gemm_bf16_shapes -- [reps]

use half::bf16;
use recycle_engine::backend::gemm::{bf16_products_active, gemm_bf16, sgemm, Half};

/// Which element type an operand of `gemm_bf16` has where its caller runs it.
#[derive(Clone, Copy)]
enum Kind {
    F32,
    Bf16,
}

/// (label, m, n, k, A kind, B kind, trans_b, sgemm's trans_a): `C[m, n] = A * op(B)`; sgemm
/// runs the same product in the form the f32 path uses.
type Shape = (&'static str, usize, usize, usize, Kind, Kind, bool, bool);

use Kind::{Bf16 as H, F32 as F};

const SHAPES: &[Shape] = &[
    // ResNet-18 28x28 b128 (f32 groups of 256 / P images): fwd W x cols, dx W^T x dY,
    // dW = dY x cols^T.
    ("r18 64->64 @28 fwd", 64, 784, 576, H, F, false, false),
    ("r18 64->64 @28 dx", 576, 784, 64, H, F, false, true),
    ("r18 64->64 @28 dw", 64, 576, 784, F, F, true, false),
    ("r18 128->128 @14 fwd", 128, 392, 1152, H, F, false, false),
    ("r18 128->128 @14 dx", 1152, 392, 128, H, F, false, true),
    ("r18 128->128 @14 dw", 128, 1152, 392, F, F, true, false),
    ("r18 256->256 @7 fwd", 256, 294, 2304, H, F, false, false),
    ("r18 256->256 @7 dx", 2304, 294, 256, H, F, false, true),
    ("r18 256->256 @7 dw", 256, 2304, 294, F, F, true, false),
    ("r18 512->512 @4 fwd", 512, 256, 4608, H, F, false, false),
    ("r18 512->512 @4 dx", 4608, 256, 512, H, F, false, true),
    ("r18 512->512 @4 dw", 512, 4608, 256, F, F, true, false),
    // ResNet-50 224 (one image a product).
    ("r50 1x1 64->256 @56 fwd", 256, 3136, 64, H, F, false, false),
    ("r50 3x3 64->64 @56 fwd", 64, 3136, 576, H, F, false, false),
    ("r50 3x3 64->64 @56 dx", 576, 3136, 64, H, F, false, true),
    ("r50 3x3 64->64 @56 dw", 64, 576, 3136, F, F, true, false),
    (
        "r50 3x3 256->256 @14 fwd",
        256,
        196,
        2304,
        H,
        F,
        false,
        false,
    ),
    (
        "r50 1x1 512->2048 @7 fwd",
        2048,
        49,
        512,
        H,
        F,
        false,
        false,
    ),
    // BERT-base, 512 rows: y = x W^T, dx = dy W, dW = dy^T x (dy^T rounded once to bf16).
    ("bert 768->768 fwd", 512, 768, 768, F, H, true, false),
    ("bert 768->3072 fwd", 512, 3072, 768, F, H, true, false),
    ("bert 3072->768 fwd", 512, 768, 3072, F, H, true, false),
    ("bert 768->3072 dx", 512, 768, 3072, F, H, false, false),
    ("bert 3072->768 dx", 512, 3072, 768, F, H, false, false),
    ("bert 768->3072 dW", 3072, 768, 512, H, F, false, true),
    ("bert 3072->768 dW", 768, 3072, 512, H, F, false, true),
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

/// The CPU time of this process's threads in seconds (`CLOCK_PROCESS_CPUTIME_ID`).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn cpu_seconds() -> f64 {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid timespec that the call fills in.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn cpu_seconds() -> f64 {
    std::time::Instant::now()
        .duration_since(*START.get_or_init(std::time::Instant::now))
        .as_secs_f64()
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Seconds per call of `f`, best of `reps` runs of `inner` calls.
fn per_call(inner: usize, f: &mut impl FnMut()) -> f64 {
    let c0 = cpu_seconds();
    for _ in 0..inner {
        f();
    }
    (cpu_seconds() - c0) / inner as f64
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7)
        .max(1);
    if !bf16_products_active() {
        println!("no AVX512_BF16 on this CPU (or RECYCLE_BF16_PRODUCTS=0): nothing to compare");
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a rayon pool");
    println!("best of {reps}, CPU time, 1 thread; GFLOP/s");
    println!("| product | m n k | sgemm | gemm_bf16 | bf16 / f32 |");
    println!("|---|---|---:|---:|---:|");
    for &(label, m, n, k, ka, kb, trans_b, trans_a) in SHAPES {
        let af: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
        let bf: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let ah: Vec<bf16> = af.iter().map(|&v| bf16::from_f32(v)).collect();
        let bh: Vec<bf16> = bf.iter().map(|&v| bf16::from_f32(v)).collect();
        let a = match ka {
            Kind::F32 => Half::F32(&af),
            Kind::Bf16 => Half::Bf16(&ah),
        };
        let b = match kb {
            Kind::F32 => Half::F32(&bf),
            Kind::Bf16 => Half::Bf16(&bh),
        };
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let inner = ((3e9 / flops) as usize).clamp(1, 300);
        let (mut t32, mut t16) = (f64::INFINITY, f64::INFINITY);
        pool.install(|| {
            let mut f32_run =
                || sgemm(trans_a, trans_b, m, n, k, 1.0, &af, &bf, 0.0, &mut c).expect("sgemm");
            f32_run();
            let mut c16 = vec![0f32; m * n];
            let mut bf16_run =
                || gemm_bf16(m, n, k, a, b, trans_b, &mut c16, false).expect("gemm_bf16");
            bf16_run();
            for _ in 0..reps {
                t32 = t32.min(per_call(inner, &mut f32_run));
                t16 = t16.min(per_call(inner, &mut bf16_run));
            }
        });
        let (g32, g16) = (flops / t32 / 1e9, flops / t16 / 1e9);
        println!(
            "| {label} | {m} {n} {k} | {g32:.0} | {g16:.0} | {:.2} |",
            g16 / g32
        );
    }
}
