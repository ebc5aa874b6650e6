//! The cases, family by family: inputs (shapes; values are drawn), the op, and its tolerances
//! in f32 (bf16 storage is held to [`super::BF16_TOL`]). Each tolerance says what the device
//! sums or rounds differently from the CPU.

use std::sync::Arc;

use super::OpCase;
use crate::ops::dropout::dropout;
use crate::ops::elementwise::{add, add_scalar, bias_add, mean, mul, scale, sub, sum, sum_axis};
use crate::ops::{self, activation};
use crate::{Result, Tape, Tensor, Var};

/// The tolerance of the kernels that promise the CPU's bits in f32 storage (one f32 operation
/// per element, moves, masks, and sums in the CPU's order).
const EXACT: (f64, f64) = (0.0, 0.0);

/// A case of `family`: `name` on inputs of `shapes`, tolerances `(output, gradients)`.
fn case(
    family: &'static str,
    name: impl Into<String>,
    shapes: &[&[usize]],
    tol: (f64, f64),
    op: impl Fn(&Tape, &[Var]) -> Result<Var> + Send + Sync + 'static,
) -> OpCase {
    OpCase {
        family,
        name: name.into(),
        shapes: shapes.iter().map(|s| s.to_vec()).collect(),
        tol,
        bf16_tol: (super::BF16_TOL, super::BF16_TOL),
        op: Arc::new(op),
    }
}

/// Every case, in the order of [`super::FAMILIES`].
pub(super) fn all() -> Vec<OpCase> {
    let mut cases = elementwise();
    cases.extend(matmul());
    cases.extend(conv());
    cases.extend(norm());
    cases.extend(gather_dropout());
    cases.extend(pool_layout());
    cases.extend(attention());
    cases.extend(cross_entropy());
    cases
}

/// Same-shape arithmetic, the bias of convolutions and linear layers, activations, softmax.
fn elementwise() -> Vec<OpCase> {
    const F: &str = "elementwise";
    let s: &[usize] = &[37, 513];
    let mut v = vec![
        case(F, "add", &[s, s], EXACT, |t, v| add(t, &v[0], &v[1])),
        case(F, "sub", &[s, s], EXACT, |t, v| sub(t, &v[0], &v[1])),
        case(F, "mul", &[s, s], EXACT, |t, v| mul(t, &v[0], &v[1])),
        // One input used twice: the tape adds its two gradients (`Tensor::add_assign`).
        case(F, "mul x x", &[s], EXACT, |t, v| mul(t, &v[0], &v[0])),
        case(F, "scale", &[s], EXACT, |t, v| scale(t, &v[0], -0.37)),
        case(F, "add_scalar", &[s], EXACT, |t, v| {
            add_scalar(t, &v[0], 2.5)
        }),
        // Bias over NCHW channels (one block per plane) and over the last axis (rows).
        case(
            F,
            "bias_add axis 1",
            &[&[4, 16, 7, 7], &[16]],
            (1e-5, 1e-5),
            |t, v| bias_add(t, &v[0], &v[1], 1),
        ),
        // d1 sums 300 rows in 8 interleaved partial sums, the CPU in blocks of 256: ~1 ulp of
        // the sum (83 here) at an element under the floor measures ~1e-4.
        case(
            F,
            "bias_add last axis",
            &[&[300, 768], &[768]],
            (1e-5, 5e-4),
            |t, v| bias_add(t, &v[0], &v[1], 1),
        ),
        case(F, "relu", &[s], EXACT, |t, v| activation::relu(t, &v[0])),
        // Backward: Φ(x) + xφ(x) cancels near x = -0.75, where f32 keeps ~1e-7 of terms ~1.
        case(F, "gelu", &[s], (1e-5, 1e-4), |t, v| {
            activation::gelu(t, &v[0])
        }),
        case(F, "tanh", &[s], (1e-5, 1e-5), |t, v| {
            activation::tanh(t, &v[0])
        }),
    ];
    // Rows shorter than a warp, a few warps, and BERT's vocabulary (strided rows).
    for shape in [&[3usize, 10][..], &[64, 1000], &[8, 30_522]] {
        // Backward: y·(g − <g, y>) cancels in g − <g, y>, a sum over the row in another
        // order (block tree against the CPU's loop).
        v.push(case(F, "softmax", &[shape], (1e-5, 2e-4), |t, v| {
            ops::softmax(t, &v[0])
        }));
        // Backward: g − exp(y)·Σg, with y ≈ -10 known to ulp(10) ≈ 1e-6 (absolute), so
        // exp(y)·Σg (Σg ~ 250 over 30k columns) is known to ~1e-6 relative, cancelling.
        v.push(case(F, "log_softmax", &[shape], (1e-5, 2e-3), |t, v| {
            ops::log_softmax(t, &v[0])
        }));
    }
    v
}

/// cuBLASLt products: every transpose combination, strided batches, linear with and without
/// the bias epilogue. Tolerance: fp32 accumulation in another order than the CPU's gemm. Over
/// k = 129 (σ = 1.5) a loop-order sum errs by ~eps·σ²·k/√2 ≈ 1.2e-5 absolute, against a floor
/// of 1e-3 of the scale (~100): ~1.2e-4 at an element under the floor, so 3e-4; 1e-4 for the
/// shorter sums; 1e-3 for the k = 768 linear.
fn matmul() -> Vec<OpCase> {
    use ops::matmul::{batched_matmul, linear, matmul};
    const F: &str = "matmul";
    let (m, k, n) = (67, 129, 45);
    let mut v = Vec::new();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        v.push(case(
            F,
            format!("matmul ta={ta} tb={tb}"),
            &[&sa, &sb],
            (3e-4, 3e-4),
            move |t, v| matmul(t, &v[0], &v[1], ta, tb),
        ));
    }
    // Attention-shaped: [batch, heads, seq, dim] x its transpose.
    v.push(case(
        F,
        "batched_matmul tb",
        &[&[2, 4, 33, 16], &[2, 4, 33, 16]],
        (1e-4, 1e-4),
        |t, v| batched_matmul(t, &v[0], &v[1], false, true),
    ));
    v.push(case(
        F,
        "batched_matmul ta",
        &[&[6, 17, 9], &[6, 17, 12]],
        (1e-4, 1e-4),
        |t, v| batched_matmul(t, &v[0], &v[1], true, false),
    ));
    // k = 768 (forward), 300 (d0), 200 (d1): a loop-order f32 sum errs by ~eps·σ²·k/√2
    // ≈ 7e-5 absolute, ~3e-4 of the floor (1e-3 of the scale ~270).
    v.push(case(
        F,
        "linear + bias",
        &[&[4, 50, 768], &[300, 768], &[300]],
        (1e-3, 1e-3),
        |t, v| linear(t, &v[0], &v[1], Some(&v[2])),
    ));
    v.push(case(
        F,
        "linear",
        &[&[37, 64], &[10, 64]],
        (1e-4, 1e-4),
        |t, v| linear(t, &v[0], &v[1], None),
    ));
    v
}

/// cuDNN convolutions (forward, backward-data, backward-filter) and the bias kernels: a 3x3
/// same convolution with bias, a strided padded one, ResNet's 7x7 stride-2 stem, a 1x1
/// stride-2 downsample. f32 runs without TF32 (FMA math); the forward sums up to 147 products
/// (7x7x3, 3x3x16) in another order than the CPU's: as for the products of `matmul`, ~1.2e-4
/// of the floor at an element under it, so 3e-4; the backward sums longer (backward-filter
/// over N·H·W, up to 2048 terms here): 1e-3, a few ulp of the scale at an element under the
/// floor.
fn conv() -> Vec<OpCase> {
    use ops::conv::{conv2d, Conv2dOptions};
    const F: &str = "convolutions";
    let o = |stride, padding| Conv2dOptions { stride, padding };
    let tol = (3e-4, 1e-3);
    vec![
        case(
            F,
            "conv2d 3x3 + bias",
            &[&[4, 16, 14, 14], &[32, 16, 3, 3], &[32]],
            tol,
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(1, 1)),
        ),
        case(
            F,
            "conv2d 3x3 s2 p1",
            &[&[3, 8, 15, 13], &[12, 8, 3, 3]],
            tol,
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 1)),
        ),
        case(
            F,
            "conv2d 7x7 s2 p3",
            &[&[2, 3, 64, 64], &[16, 3, 7, 7]],
            tol,
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 3)),
        ),
        case(
            F,
            "conv2d 1x1 s2 + bias",
            &[&[4, 32, 8, 8], &[64, 32, 1, 1], &[64]],
            tol,
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(2, 0)),
        ),
    ]
}

/// Layer norm (BERT's rows) and batch norm (training, and evaluation from the running
/// statistics).
fn norm() -> Vec<OpCase> {
    use ops::{batch_norm2d, layer_norm, BatchNormOptions};
    const F: &str = "norms";
    // BERT's rows; rows shorter than a warp (many rows per backward block); rows longer than
    // a block.
    let mut v: Vec<OpCase> = [[4usize, 33, 768], [1, 300, 37], [1, 2, 3000]]
        .into_iter()
        .map(|s| {
            let d = s[2];
            case(F, "layer_norm", &[&s, &[d], &[d]], (1e-4, 1e-4), |t, v| {
                layer_norm(t, &v[0], &v[1], &v[2], 1e-12)
            })
        })
        .collect();
    // The statistics split over two blocks per channel (a split boundary inside a plane).
    v.push(case(
        F,
        "batch_norm2d training=true",
        &[&[3, 2, 105, 105], &[2], &[2]],
        (1e-4, 1e-4),
        |t, v| {
            let dev = v[0].tensor().device();
            let rm = Tensor::from_slice(&[0.1f32; 2], &[2], dev)?;
            let rv = Tensor::from_slice(&[2.0f32; 2], &[2], dev)?;
            batch_norm2d(
                t,
                &v[0],
                &v[1],
                &v[2],
                &rm,
                &rv,
                BatchNormOptions::default(),
            )
        },
    ));
    for training in [true, false] {
        let opts = BatchNormOptions {
            training,
            ..BatchNormOptions::default()
        };
        // Running statistics made beside the input, on its device: the same values on both
        // sides (mean 0.1, variance 2).
        v.push(case(
            F,
            format!("batch_norm2d training={training}"),
            &[&[6, 24, 7, 7], &[24], &[24]],
            (1e-4, 1e-4),
            move |t, v| {
                let dev = v[0].tensor().device();
                let rm = Tensor::from_slice(&[0.1f32; 24], &[24], dev)?;
                let rv = Tensor::from_slice(&[2.0f32; 24], &[24], dev)?;
                batch_norm2d(t, &v[0], &v[1], &v[2], &rm, &rv, opts)
            },
        ));
    }
    v
}

/// Row gathers (embedding, gather_rows) with repeated ids, whose backward adds several rows
/// into one (the counting-sort backward: the CPU's order, so f32 is bit-exact), and dropout
/// (the shared counter-based mask: the same elements dropped, the same bits in f32).
fn gather_dropout() -> Vec<OpCase> {
    use ops::embedding::embedding;
    use ops::gather::gather_rows;
    const F: &str = "gathers and dropout";
    // 2 * 300 ids over a vocabulary of 1000: many repeats, many unused rows.
    let ids: Vec<i32> = (0..600u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as i32 % 1000)
        .collect();
    let ids_g: Vec<i32> = ids.iter().map(|i| i % 50).collect();
    vec![
        case(F, "embedding", &[&[1000, 96]], EXACT, move |t, v| {
            let dev = v[0].tensor().device();
            embedding(t, &v[0], &Tensor::from_slice(&ids, &[2, 300], dev)?)
        }),
        case(F, "gather_rows", &[&[50, 4, 7]], EXACT, move |t, v| {
            let dev = v[0].tensor().device();
            gather_rows(t, &v[0], &Tensor::from_slice(&ids_g, &[600], dev)?)
        }),
        case(F, "dropout p=0.1", &[&[37, 513]], EXACT, |t, v| {
            dropout(t, &v[0], 0.1, 0xd409, true)
        }),
    ]
}

/// Pooling (ResNet's stem max-pool and head), the layout copies, reductions and broadcasting
/// binary ops (`layout.cu`: strided copies, per-output sequential sums, f64 whole-tensor sums).
fn pool_layout() -> Vec<OpCase> {
    use ops::layout::{concat, narrow, permute, transpose};
    use ops::pool::{global_avg_pool2d, max_pool2d};
    const F: &str = "pools and layouts";
    vec![
        case(
            F,
            "max_pool2d 3x3 s2 p1",
            &[&[4, 8, 28, 27]],
            EXACT,
            |t, v| max_pool2d(t, &v[0], 3, 2, 1),
        ),
        case(F, "global_avg_pool2d", &[&[4, 64, 7, 7]], EXACT, |t, v| {
            global_avg_pool2d(t, &v[0])
        }),
        case(F, "permute", &[&[2, 33, 12, 16]], EXACT, |t, v| {
            permute(t, &v[0], &[0, 2, 1, 3])
        }),
        case(F, "transpose", &[&[37, 53]], EXACT, |t, v| {
            transpose(t, &v[0], 0, 1)
        }),
        case(F, "narrow", &[&[5, 40, 9]], EXACT, |t, v| {
            narrow(t, &v[0], 1, 7, 20)
        }),
        case(
            F,
            "concat axis 1",
            &[&[3, 5, 8], &[3, 2, 8], &[3, 7, 8]],
            EXACT,
            |t, v| concat(t, &[&v[0], &v[1], &v[2]], 1),
        ),
        case(F, "sum", &[&[300, 77]], (1e-5, 1e-5), |t, v| sum(t, &v[0])),
        case(F, "mean", &[&[300, 77]], (1e-5, 1e-5), |t, v| {
            mean(t, &v[0])
        }),
        case(F, "sum_axis 1", &[&[6, 50, 33]], EXACT, |t, v| {
            sum_axis(t, &v[0], 1, false)
        }),
        // Broadcasting: a row vector, a [N, 1, D] against [N, S, D] (attention masks).
        case(
            F,
            "add broadcast",
            &[&[64, 96], &[96]],
            (1e-5, 1e-5),
            |t, v| add(t, &v[0], &v[1]),
        ),
        case(
            F,
            "sub broadcast",
            &[&[4, 1, 32], &[4, 17, 32]],
            (1e-5, 1e-5),
            |t, v| sub(t, &v[0], &v[1]),
        ),
        case(
            F,
            "mul broadcast",
            &[&[4, 17, 32], &[4, 1, 32]],
            (1e-5, 1e-5),
            |t, v| mul(t, &v[0], &v[1]),
        ),
    ]
}

/// Attention (on a GPU, the composition of the product, scale, mask, softmax and dropout
/// functions; on the CPU, the fused arm), with a padding mask (the last 7 keys of item 1) and
/// dropout.
fn attention() -> Vec<OpCase> {
    use ops::{scaled_dot_product_attention, AttentionOptions};
    const F: &str = "attention";
    let mut mask = vec![1i32; 2 * 40];
    mask[40 + 33..].iter_mut().for_each(|m| *m = 0);
    [false, true]
        .into_iter()
        .map(|training| {
            let mask = mask.clone();
            let opts = AttentionOptions {
                dropout: 0.1,
                seed: 0xa77e,
                training,
            };
            // Forward: two products and an exp in another order than the fused CPU arm; one
            // ulp of the scale at an element under the floor already measures 1.2e-4.
            // Backward: the GPU composes softmax's cancelling backward from stored parts (and
            // dropout's scaled copy), the CPU's fused arm rounds elsewhere: a few ulp of scale.
            case(
                F,
                format!("attention mask, dropout={training}"),
                &[&[2, 4, 33, 16], &[2, 4, 40, 16], &[2, 4, 40, 24]],
                (2e-4, 1e-3),
                move |t, v| {
                    let m = Tensor::from_slice(&mask, &[2, 40], v[0].tensor().device())?;
                    scaled_dot_product_attention(t, &v[0], &v[1], &v[2], Some(&m), opts)
                },
            )
        })
        .collect()
}

/// Cross-entropy over ImageNet-sized rows without an ignore index, and over BERT-sized rows
/// with ignored rows (every 7th) and label smoothing: a scalar loss and the logits' gradient.
fn cross_entropy() -> Vec<OpCase> {
    use ops::{cross_entropy, CrossEntropyOptions};
    const F: &str = "cross-entropy";
    [(64usize, 1000usize, 0.0f32), (48, 30_522, 0.1)]
        .into_iter()
        .enumerate()
        .map(|(k, (rows, classes, smoothing))| {
            let labels: Vec<i32> = (0..rows)
                .map(|r| {
                    if r % 7 == 3 && k == 1 {
                        -100
                    } else {
                        ((r as u64 * 2_654_435_761 + k as u64) % classes as u64) as i32
                    }
                })
                .collect();
            let opts = CrossEntropyOptions {
                ignore_index: (k == 1).then_some(-100),
                label_smoothing: smoothing,
            };
            case(
                F,
                format!("cross_entropy (smoothing {smoothing})"),
                &[&[rows, classes]],
                (1e-5, 1e-5),
                move |t, v| {
                    let labels = Tensor::from_slice(&labels, &[rows], crate::Device::Cpu)?;
                    cross_entropy(t, &v[0], &labels, opts)
                },
            )
        })
        .collect()
}
