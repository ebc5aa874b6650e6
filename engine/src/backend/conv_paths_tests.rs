//! The CPU convolution's specialised paths against their readable oracles, on many shapes
//! (odd sizes, every padding a kernel allows, strides, groups of images with a partial last
//! one): the one-copy im2col rows of "same" convolutions against the per-row `im2col_row`, and
//! the input gradient run as a forward convolution of the flipped weight against the lowered
//! one (`W^T x dY` scattered back by col2im).

use super::*;
use crate::backend::Conv2dOptions;
use crate::gradcheck::GradCheck;
use crate::ops::conv::conv2d;

fn values(len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| crate::rng::normal_at(seed, i as u64))
        .collect()
}

fn geometry(x: [usize; 4], o: usize, k: usize, stride: usize, padding: usize) -> Conv2dGeometry {
    Conv2dGeometry::new(&x, &[o, x[1], k, k], Conv2dOptions { stride, padding }).unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

/// (input, output channels, kernel, stride, padding): "same" convolutions of odd and even
/// sizes (1-wide images, one-pixel images, non-square images), kernels 1-5 at each padding
/// they allow, and shapes outside the specialised paths (strided, padding of a kernel's size).
const SHAPES: &[([usize; 4], usize, usize, usize, usize)] = &[
    ([3, 2, 5, 5], 3, 3, 1, 1),
    ([4, 3, 4, 7], 5, 3, 1, 1),
    ([5, 2, 1, 6], 3, 3, 1, 1),
    ([3, 3, 1, 1], 4, 3, 1, 1),
    ([2, 4, 9, 3], 2, 5, 1, 2),
    ([3, 1, 6, 6], 2, 5, 1, 1),
    ([2, 3, 7, 5], 4, 3, 1, 0),
    ([3, 2, 6, 6], 3, 4, 1, 2),
    ([3, 2, 6, 6], 3, 4, 1, 3),
    ([2, 2, 8, 8], 3, 2, 1, 0),
    ([4, 3, 7, 7], 2, 1, 1, 0),
    ([3, 2, 9, 9], 3, 3, 2, 1),
    ([2, 3, 8, 8], 4, 1, 2, 0),
    ([9, 3, 4, 4], 5, 3, 1, 1),
];

#[test]
fn same_rows_match_per_row_im2col() {
    for (si, &(xs, o, k, s, p)) in SHAPES.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        for items in [1, 2, g.n] {
            let x = values(items * g.image(), 1 + si as u64);
            let row_len = items * g.pixels();
            let mut want = vec![f32::NAN; g.patch() * row_len];
            for (r, row) in want.chunks_mut(row_len).enumerate() {
                im2col_row(&x, &g, items, r, row);
            }
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; want.len()];
                im2col_cpu(&x, &g, items, &mut got, parallel);
                // Copies: bit-identical, the padding included.
                assert_eq!(got, want, "shape {si}, {items} images, parallel {parallel}");
            }
        }
    }
}

/// More "same" shapes than a thread keeps mask tables for, twice over, large images before
/// small ones: evicted tables are rebuilt right, and a reused tall buffer's stale contents
/// never reach the columns.
#[test]
fn same_rows_stay_right_past_the_mask_cache() {
    let shapes: Vec<Conv2dGeometry> = (1..=6)
        .flat_map(|h| (1..=6).map(move |w| (h, w)))
        .rev()
        .map(|(h, w)| geometry([2, 2, h, w], 2, 3, 1, 1))
        .collect();
    assert!(shapes.len() > 2 * MASK_SHAPES);
    for round in 0..2 {
        for (si, g) in shapes.iter().enumerate() {
            let x = values(g.n * g.image(), 50 + si as u64);
            let row_len = g.n * g.pixels();
            let mut want = vec![f32::NAN; g.patch() * row_len];
            for (r, row) in want.chunks_mut(row_len).enumerate() {
                im2col_row(&x, g, g.n, r, row);
            }
            let mut got = vec![f32::NAN; want.len()];
            im2col_cpu(&x, g, g.n, &mut got, false);
            assert_eq!(got, want, "round {round}, {g:?}");
        }
    }
}

/// (input, output channels, kernel, stride, padding, whether the rule under test picks it).
type PickedShape = ([usize; 4], usize, usize, usize, usize, bool);

/// Strided shapes on both sides of `phase_rows` (strides 2 and 3, odd and even images, every
/// padding a kernel allows, kernels narrower than the stride, outputs that are not the input
/// divided by the stride): the rows built from the stride phases are bit-identical to the
/// per-row gather, and the rule picks the phases exactly where it says.
#[test]
fn strided_phase_rows_match_per_row_im2col() {
    let shapes: &[PickedShape] = &[
        ([3, 2, 8, 8], 3, 3, 2, 1, true),
        ([2, 3, 9, 7], 2, 3, 2, 1, true),
        ([2, 2, 7, 7], 2, 3, 2, 0, false),
        ([2, 2, 8, 8], 2, 2, 2, 0, true),
        ([2, 2, 7, 9], 3, 4, 2, 2, true),
        ([2, 2, 7, 9], 3, 4, 2, 1, false),
        ([2, 2, 9, 9], 2, 5, 2, 2, true),
        ([2, 2, 10, 11], 2, 3, 3, 1, true),
        ([2, 2, 6, 6], 2, 5, 3, 2, true),
        ([3, 2, 1, 1], 2, 3, 2, 1, true),
        ([2, 3, 2, 3], 2, 3, 2, 1, true),
        ([2, 2, 8, 8], 2, 1, 2, 0, false),
        ([2, 2, 9, 9], 2, 3, 2, 2, false),
        ([2, 2, 9, 9], 2, 2, 3, 1, false),
    ];
    for (si, &(xs, o, k, s, p, phases)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        assert_eq!(phase_rows(&g), phases, "shape {si}: {g:?}");
        for items in [1, 2, g.n] {
            let x = values(items * g.image(), 60 + si as u64);
            let row_len = items * g.pixels();
            let mut want = vec![f32::NAN; g.patch() * row_len];
            for (r, row) in want.chunks_mut(row_len).enumerate() {
                im2col_row(&x, &g, items, r, row);
            }
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; want.len()];
                im2col_cpu(&x, &g, items, &mut got, parallel);
                assert_eq!(got, want, "shape {si}, {items} images, parallel {parallel}");
            }
        }
    }
}

#[test]
fn shifted_rows_cover_same_convolutions_only() {
    assert!(shifts_rows(&geometry([1, 1, 5, 5], 1, 3, 1, 1)));
    assert!(shifts_rows(&geometry([1, 1, 5, 5], 1, 5, 1, 2)));
    assert!(!shifts_rows(&geometry([1, 1, 5, 5], 1, 3, 1, 0)));
    assert!(!shifts_rows(&geometry([1, 1, 5, 5], 1, 3, 2, 1)));
}

#[test]
fn input_gradient_by_forward_matches_lowered() {
    let schedules = [
        ConvSchedule::PerItem,
        ConvSchedule::Grouped { items: 2 },
        ConvSchedule::Grouped { items: 4 },
        ConvSchedule::Batched { items: 1 },
        ConvSchedule::Batched { items: 3 },
    ];
    for (si, &(xs, o, k, s, p)) in SHAPES.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        let expect_forward = s == 1 && p < k && k > 1;
        assert_eq!(
            transposed_geometry(&g).is_some(),
            expect_forward,
            "shape {si}"
        );
        let x = values(g.n * g.image(), 10 + si as u64);
        let w = values(g.o * g.patch(), 20 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 30 + si as u64);
        for sched in schedules {
            let want = conv2d_backward_cpu_lowered(&x, &w, &dy, &g, [true; 3], sched).unwrap();
            let got = conv2d_backward_cpu_with(&x, &w, &dy, &g, [true; 3], sched).unwrap();
            let what = format!("shape {si} {sched:?}");
            assert_close(
                got.x.as_ref().unwrap(),
                want.x.as_ref().unwrap(),
                1e-5,
                &what,
            );
            // The weight and bias gradients take the same path either way.
            assert_eq!(got.weight, want.weight, "{what}");
            assert_eq!(got.bias, want.bias, "{what}");
            let only_x =
                conv2d_backward_cpu_with(&x, &w, &dy, &g, [true, false, false], sched).unwrap();
            assert_eq!(only_x.x, got.x, "{what}");
            assert!(only_x.weight.is_none() && only_x.bias.is_none(), "{what}");
        }
    }
}

#[test]
fn flipped_weight_swaps_channels_and_turns_the_kernel() {
    let g = geometry([1, 2, 4, 4], 3, 2, 1, 1);
    let w: Vec<f32> = (0..g.o * g.patch()).map(|v| v as f32).collect();
    let f = flipped_weight(&w, &g);
    for o in 0..3 {
        for c in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    assert_eq!(
                        f[((c * 3 + o) * 2 + i) * 2 + j],
                        w[((o * 2 + c) * 2 + (1 - i)) * 2 + (1 - j)]
                    );
                }
            }
        }
    }
}

/// Finite differences through the tape for the shapes whose input gradient runs as a forward
/// convolution with a padding other than 1 (5x5 at padding 1 and 2, 3x3 unpadded, 4x4).
#[test]
fn forward_input_gradient_matches_finite_differences() {
    for (si, &(xs, o, k, s, p)) in [SHAPES[4], SHAPES[5], SHAPES[6], SHAPES[7]]
        .iter()
        .enumerate()
    {
        let g = geometry(xs, o, k, s, p);
        assert!(transposed_geometry(&g).is_some());
        let x = crate::Tensor::f32(values(g.n * g.image(), 40 + si as u64), &xs).unwrap();
        let w = crate::Tensor::f32(values(g.o * g.patch(), 50), &[o, xs[1], k, k]).unwrap();
        GradCheck::default()
            .run(&[x, w], &[0, 1], |tape, v| {
                conv2d(
                    tape,
                    &v[0],
                    &v[1],
                    None,
                    Conv2dOptions {
                        stride: s,
                        padding: p,
                    },
                )
            })
            .unwrap_or_else(|e| panic!("shape {si}: {e}"));
    }
}

/// `dW[o, c, i, j] = sum over n, oh, ow of dY[n, o, oh, ow] * x[n, c, oh*s + i - p, ow*s + j - p]`,
/// by loops: the oracle of the weight gradient's two product forms.
fn naive_dw(x: &[f32], dy: &[f32], g: &Conv2dGeometry) -> Vec<f32> {
    let mut dw = vec![0f64; g.o * g.patch()];
    for n in 0..g.n {
        for o in 0..g.o {
            for c in 0..g.c {
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let mut acc = 0f64;
                        for oh in 0..g.oh {
                            for ow in 0..g.ow {
                                let (ih, iw) = (oh * g.stride + i, ow * g.stride + j);
                                if ih < g.padding || iw < g.padding {
                                    continue;
                                }
                                let (ih, iw) = (ih - g.padding, iw - g.padding);
                                if ih >= g.h || iw >= g.w {
                                    continue;
                                }
                                acc += dy[((n * g.o + o) * g.oh + oh) * g.ow + ow] as f64
                                    * x[((n * g.c + c) * g.h + ih) * g.w + iw] as f64;
                            }
                        }
                        dw[((o * g.c + c) * g.kh + i) * g.kw + j] += acc;
                    }
                }
            }
        }
    }
    dw.into_iter().map(|v| v as f32).collect()
}

/// The weight gradient in both product forms (`dW = dY x cols^T`, and `dW^T = cols x dY^T`
/// where `dw_by_columns_in_place` picks it), every schedule, against the loops: shapes on
/// both sides of the rule (filters 8-300, patches below and above 64, strides, odd sizes).
#[test]
fn weight_gradient_forms_match_loops() {
    let shapes: &[([usize; 4], usize, usize, usize, usize)] = &[
        ([3, 8, 7, 5], 16, 3, 1, 1),
        ([5, 8, 4, 4], 40, 3, 1, 1),
        ([2, 9, 9, 9], 17, 3, 2, 1),
        ([7, 16, 3, 3], 33, 3, 1, 1),
        ([2, 8, 5, 6], 300, 3, 1, 1),
        ([3, 8, 6, 6], 8, 3, 1, 1),
        ([3, 1, 6, 6], 32, 3, 1, 1),
        ([3, 70, 5, 5], 24, 1, 1, 0),
        ([2, 4, 9, 7], 20, 5, 1, 2),
    ];
    let mut saw = [false; 2];
    for (si, &(xs, o, k, s, p)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        saw[usize::from(dw_by_columns_in_place(&g))] = true;
        let x = values(g.n * g.image(), 70 + si as u64);
        let w = values(g.o * g.patch(), 80 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 90 + si as u64);
        let want = naive_dw(&x, &dy, &g);
        for schedule in [
            ConvSchedule::PerItem,
            ConvSchedule::Grouped { items: 2 },
            ConvSchedule::Grouped { items: 3 },
            ConvSchedule::Batched { items: 2 },
        ] {
            let got =
                conv2d_backward_cpu_with(&x, &w, &dy, &g, [false, true, false], schedule).unwrap();
            let what = format!("shape {si}, {schedule:?}");
            assert_close(&got.weight.unwrap(), &want, 1e-4, &what);
        }
    }
    assert_eq!(saw, [true, true], "both forms exercised");
}

/// The forward and every gradient of the automatic schedule on pools of 1, 2 and 3 threads:
/// bit-identical, whichever thread runs which images (batches at least as large as the pool,
/// where the products stay on their threads): "same", strided, pointwise and small-image
/// shapes, batches that split into uneven runs and groups.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let shapes: &[([usize; 4], usize, usize, usize, usize)] = &[
        ([13, 3, 6, 6], 4, 3, 1, 1),
        ([11, 2, 9, 7], 3, 3, 2, 1),
        ([10, 4, 5, 5], 6, 1, 1, 0),
        ([9, 3, 7, 7], 5, 1, 2, 0),
        ([37, 5, 4, 4], 7, 3, 1, 1),
        ([29, 4, 3, 3], 3, 3, 2, 1),
        // dW summed as dW^T (`dw_by_columns_in_place`), 20 filters: a partial transpose block.
        ([19, 8, 5, 5], 20, 3, 1, 1),
    ];
    for (si, &(xs, o, k, s, p)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        let x = values(g.n * g.image(), 70 + si as u64);
        let w = values(g.o * g.patch(), 80 + si as u64);
        let b = values(g.o, 90 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 100 + si as u64);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut out = vec![f32::NAN; g.n * g.o * g.pixels()];
                conv2d_forward_cpu(&x, &w, Some(&b), &g, &mut out).unwrap();
                let grads = conv2d_backward_cpu(&x, &w, &dy, &g, [true; 3]).unwrap();
                (out, grads)
            })
        };
        let (out1, grads1) = run(1);
        for threads in [2, 3] {
            let (out, grads) = run(threads);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let what = format!("shape {si}, {threads} threads");
            assert_eq!(bits(&out), bits(&out1), "forward, {what}");
            for (got, want, name) in [
                (&grads.x, &grads1.x, "dx"),
                (&grads.weight, &grads1.weight, "dw"),
                (&grads.bias, &grads1.bias, "dbias"),
            ] {
                let (got, want) = (got.as_ref().unwrap(), want.as_ref().unwrap());
                assert_eq!(bits(got), bits(want), "{name}, {what}");
            }
        }
    }
}

/// The weight gradient computed directly from the stride phases (`direct_weight_gradient_fits`)
/// against the loops, on shapes on both sides of the rule (1-32 filters, 1-17 channels,
/// strides 1-3, kernels 3-5 and a 4x4 one whose rows end in a short block, one-pixel and
/// odd images, batches that split into partial chunks of images), every schedule; the other
/// gradients beside it against the lowered oracle; and the automatic schedule bit-identical on
/// 1, 2 and 3 threads (up to the batch size).
#[test]
fn direct_weight_gradient_matches_loops() {
    let shapes: &[PickedShape] = &[
        ([3, 1, 28, 28], 8, 3, 1, 1, true),
        ([2, 8, 14, 14], 8, 3, 1, 1, true),
        ([5, 4, 5, 7], 16, 3, 1, 1, true),
        ([37, 3, 4, 4], 8, 3, 1, 1, true),
        ([3, 8, 9, 9], 16, 3, 2, 1, true),
        ([2, 4, 10, 11], 8, 3, 3, 1, true),
        ([2, 3, 9, 9], 8, 5, 2, 2, true),
        ([2, 1, 8, 8], 8, 4, 2, 1, true),
        ([3, 2, 1, 1], 8, 3, 2, 1, true),
        ([3, 16, 5, 5], 32, 3, 1, 1, true),
        ([3, 17, 5, 5], 32, 3, 1, 1, false),
        ([3, 4, 5, 5], 12, 3, 1, 1, false),
        ([3, 2, 5, 5], 40, 3, 1, 1, false),
        ([3, 8, 7, 7], 8, 1, 1, 0, false),
        ([3, 2, 7, 7], 8, 3, 2, 0, false),
    ];
    let mut saw = [false; 2];
    for (si, &(xs, o, k, s, p, direct)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        let fits = direct_weight_gradient_fits(&g);
        assert_eq!(fits, direct && avx512_active(), "shape {si}: {g:?}");
        saw[usize::from(fits)] = true;
        let x = values(g.n * g.image(), 110 + si as u64);
        let w = values(g.o * g.patch(), 120 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 130 + si as u64);
        let want = naive_dw(&x, &dy, &g);
        for schedule in [
            ConvSchedule::PerItem,
            ConvSchedule::Grouped { items: 2 },
            ConvSchedule::Grouped { items: 3 },
            ConvSchedule::Batched { items: 2 },
        ] {
            let what = format!("shape {si}, {schedule:?}");
            let got = conv2d_backward_cpu_with(&x, &w, &dy, &g, [true; 3], schedule).unwrap();
            assert_close(got.weight.as_ref().unwrap(), &want, 1e-4, &what);
            let only_w =
                conv2d_backward_cpu_with(&x, &w, &dy, &g, [false, true, false], schedule).unwrap();
            assert_eq!(only_w.weight, got.weight, "{what}");
            let lowered =
                conv2d_backward_cpu_lowered(&x, &w, &dy, &g, [true; 3], schedule).unwrap();
            assert_close(
                got.x.as_ref().unwrap(),
                lowered.x.as_ref().unwrap(),
                1e-4,
                &what,
            );
            assert_eq!(got.bias, lowered.bias, "{what}");
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| conv2d_backward_cpu(&x, &w, &dy, &g, [true; 3]).unwrap())
        };
        let one = run(1);
        let bits = |v: &Option<Vec<f32>>| {
            v.as_ref()
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect::<Vec<_>>()
        };
        // Pools no larger than the batch, where the products stay on their threads.
        for threads in [2, 3].into_iter().filter(|&t| t <= g.n) {
            let many = run(threads);
            assert_eq!(
                bits(&many.weight),
                bits(&one.weight),
                "shape {si}, {threads} threads"
            );
            assert_eq!(bits(&many.x), bits(&one.x), "shape {si}, {threads} threads");
        }
    }
    assert!(saw[0] && saw[1] == avx512_active(), "both paths exercised");
}

/// `out[n, o, oh, ow] = bias[o] + sum over c, i, j of w[o, c, i, j] * x[n, c, oh*s + i - p,
/// ow*s + j - p]`, by loops in f64: the oracle of the forward's paths.
fn naive_forward(x: &[f32], w: &[f32], bias: &[f32], g: &Conv2dGeometry) -> Vec<f32> {
    let mut out = vec![0f32; g.n * g.o * g.pixels()];
    for n in 0..g.n {
        for o in 0..g.o {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    let mut acc = bias[o] as f64;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let (ih, iw) = (oh * g.stride + i, ow * g.stride + j);
                                if ih < g.padding || iw < g.padding {
                                    continue;
                                }
                                let (ih, iw) = (ih - g.padding, iw - g.padding);
                                if ih >= g.h || iw >= g.w {
                                    continue;
                                }
                                acc += w[((o * g.c + c) * g.kh + i) * g.kw + j] as f64
                                    * x[((n * g.c + c) * g.h + ih) * g.w + iw] as f64;
                            }
                        }
                    }
                    out[((n * g.o + o) * g.oh + oh) * g.ow + ow] = acc as f32;
                }
            }
        }
    }
    out
}

/// The forward read directly from the stride phases (`direct_forward_fits`) against the
/// loops, with a bias, on shapes on both sides of the rule (8-72 filters, strides 1-3, kernels
/// 3-5 and 4x4, one-pixel and odd images, groups with a partial last one, blocks of 48
/// pixels past a group's end), every schedule; the input gradient of the stride-1 shapes (a
/// forward through the same path) against the lowered oracle; and the automatic schedule
/// bit-identical on 1, 2 and 3 threads (up to the batch size).
#[test]
fn direct_forward_matches_loops() {
    let shapes: &[PickedShape] = &[
        ([3, 1, 28, 28], 8, 3, 1, 1, true),
        ([2, 8, 14, 14], 16, 3, 1, 1, true),
        ([5, 4, 5, 7], 24, 3, 1, 1, true),
        ([37, 3, 4, 4], 8, 3, 1, 1, true),
        ([3, 8, 9, 9], 16, 3, 2, 1, true),
        ([2, 4, 10, 11], 8, 3, 3, 1, true),
        ([2, 3, 9, 9], 8, 5, 2, 2, true),
        ([2, 1, 8, 8], 8, 4, 2, 1, true),
        ([3, 2, 1, 1], 8, 3, 2, 1, true),
        ([4, 5, 3, 3], 64, 3, 1, 1, true),
        ([3, 2, 5, 5], 72, 3, 1, 1, false),
        ([3, 4, 5, 5], 12, 3, 1, 1, false),
        ([3, 8, 7, 7], 8, 1, 1, 0, false),
        ([3, 2, 7, 7], 8, 3, 2, 0, false),
    ];
    let mut saw = [false; 2];
    for (si, &(xs, o, k, s, p, direct)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        let fits = direct_forward_fits(&g);
        assert_eq!(fits, direct && avx512_active(), "shape {si}: {g:?}");
        saw[usize::from(fits)] = true;
        let x = values(g.n * g.image(), 140 + si as u64);
        let w = values(g.o * g.patch(), 150 + si as u64);
        let b = values(g.o, 160 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 170 + si as u64);
        let want = naive_forward(&x, &w, &b, &g);
        for schedule in [
            ConvSchedule::PerItem,
            ConvSchedule::Grouped { items: 2 },
            ConvSchedule::Grouped { items: 3 },
            ConvSchedule::Batched { items: 2 },
        ] {
            let what = format!("shape {si}, {schedule:?}");
            let mut got = vec![f32::NAN; want.len()];
            conv2d_forward_cpu_with(&x, &w, Some(&b), &g, &mut got, schedule).unwrap();
            assert_close(&got, &want, 1e-4, &what);
            let dx = conv2d_backward_cpu_with(&x, &w, &dy, &g, [true, false, false], schedule)
                .unwrap()
                .x;
            let lowered =
                conv2d_backward_cpu_lowered(&x, &w, &dy, &g, [true, false, false], schedule)
                    .unwrap()
                    .x;
            assert_close(&dx.unwrap(), &lowered.unwrap(), 1e-4, &what);
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut out = vec![f32::NAN; want.len()];
                conv2d_forward_cpu(&x, &w, Some(&b), &g, &mut out).unwrap();
                out.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            })
        };
        let one = run(1);
        for threads in [2, 3].into_iter().filter(|&t| t <= g.n) {
            assert_eq!(run(threads), one, "shape {si}, {threads} threads");
        }
    }
    assert!(saw[0] && saw[1] == avx512_active(), "both paths exercised");
}

/// The blocked transpose against the element-by-element definition, with partial blocks.
#[test]
fn transpose_into_transposes() {
    for (rows, cols) in [(1, 1), (3, 16), (72, 20), (5, 33), (0, 4)] {
        let src = values(rows * cols, 7);
        let mut dst = vec![f32::NAN; rows * cols];
        transpose_into(&src, rows, cols, &mut dst);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    dst[c * rows + r],
                    src[r * cols + c],
                    "{rows}x{cols} at {r}, {c}"
                );
            }
        }
    }
}

/// Winograd F(2,3) (`winograd::fits`) against the loops, with a bias, on shapes on both sides
/// of the rule (63-144 channels and filters, counts that are not a multiple of the 16 lanes,
/// 64 channels on images just above and below 14x14 pixels, odd and non-square images down
/// to 1x1, one image, a 3x3 kernel without padding or strided), every schedule that runs it; the transforms in AVX-512 lanes bit-identical to the
/// baseline copy; and the input gradient (the same forward of `dY` with the flipped weight)
/// against the lowered oracle.
#[test]
fn winograd_forward_matches_loops() {
    let shapes: &[PickedShape] = &[
        ([2, 128, 7, 7], 128, 3, 1, 1, true),
        ([1, 128, 5, 5], 144, 3, 1, 1, true),
        ([3, 130, 4, 6], 136, 3, 1, 1, true),
        ([2, 128, 9, 3], 129, 3, 1, 1, true),
        ([2, 128, 1, 1], 128, 3, 1, 1, true),
        ([2, 64, 14, 14], 80, 3, 1, 1, true),
        ([2, 66, 13, 17], 64, 3, 1, 1, true),
        ([2, 64, 13, 15], 64, 3, 1, 1, false),
        ([2, 127, 5, 5], 128, 3, 1, 1, false),
        ([2, 63, 14, 14], 64, 3, 1, 1, false),
        ([2, 64, 5, 5], 48, 3, 1, 1, false),
        ([2, 128, 6, 6], 128, 3, 1, 0, false),
        ([2, 128, 7, 7], 128, 3, 2, 1, false),
        ([2, 128, 7, 7], 128, 5, 1, 2, false),
    ];
    let mut saw = [false; 2];
    for (si, &(xs, o, k, s, p, wino)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        assert_eq!(winograd::fits(&g), wino, "shape {si}: {g:?}");
        saw[usize::from(wino)] = true;
        let x = values(g.n * g.image(), 180 + si as u64);
        let w = values(g.o * g.patch(), 190 + si as u64);
        let b = values(g.o, 200 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 210 + si as u64);
        let want = naive_forward(&x, &w, &b, &g);
        for schedule in [ConvSchedule::PerItem, ConvSchedule::Grouped { items: 2 }] {
            let what = format!("shape {si}, {schedule:?}");
            let mut got = vec![f32::NAN; want.len()];
            conv2d_forward_cpu_with(&x, &w, Some(&b), &g, &mut got, schedule).unwrap();
            assert_close(&got, &want, 1e-4, &what);
            let mut unbiased = vec![f32::NAN; want.len()];
            conv2d_forward_cpu_with(&x, &w, None, &g, &mut unbiased, schedule).unwrap();
            let want_unbiased = naive_forward(&x, &w, &vec![0.0; g.o], &g);
            assert_close(&unbiased, &want_unbiased, 1e-4, &what);
            let dx = conv2d_backward_cpu_with(&x, &w, &dy, &g, [true, false, false], schedule)
                .unwrap()
                .x;
            let lowered =
                conv2d_backward_cpu_lowered(&x, &w, &dy, &g, [true, false, false], schedule)
                    .unwrap()
                    .x;
            assert_close(&dx.unwrap(), &lowered.unwrap(), 1e-4, &what);
        }
        if wino && avx512_active() {
            let run = |lanes: bool| {
                let mut out = vec![f32::NAN; want.len()];
                winograd::forward_lanes(&x, &w, Some(&b), &g, &mut out, lanes).unwrap();
                out.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(true), run(false), "shape {si}: lanes against baseline");
        }
    }
    assert_eq!(saw, [true, true], "both sides of the rule exercised");
}

/// The Winograd forward and both gradients on pools of 1, 2 and 3 threads: bit-identical (a
/// batch of three chunks, the last one partial, odd images).
#[test]
fn winograd_results_do_not_depend_on_the_thread_count() {
    let g = geometry([19, 64, 15, 14], 64, 3, 1, 1);
    assert!(winograd::fits(&g));
    let x = values(g.n * g.image(), 220);
    let w = values(g.o * g.patch(), 221);
    let b = values(g.o, 222);
    let dy = values(g.n * g.o * g.pixels(), 223);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = vec![f32::NAN; g.n * g.o * g.pixels()];
            conv2d_forward_cpu(&x, &w, Some(&b), &g, &mut out).unwrap();
            let dx = conv2d_backward_cpu(&x, &w, &dy, &g, [true, false, false]).unwrap();
            let dw = conv2d_backward_cpu(&x, &w, &dy, &g, [false, true, false]).unwrap();
            (bits(&out), bits(&dx.x.unwrap()), bits(&dw.weight.unwrap()))
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        assert_eq!(run(threads), one, "{threads} threads");
    }
}

/// The Winograd weight gradient (`winograd::weight_gradient`) against the loops on shapes on
/// both sides of the rule (channel and filter counts off the 16 lanes, odd, non-square and
/// 1x1 images, one image, batches of several chunks with a partial last one), with the other
/// gradients beside it unchanged; the transforms in AVX-512 lanes bit-identical to the
/// baseline copy.
#[test]
fn winograd_weight_gradient_matches_loops() {
    let shapes: &[PickedShape] = &[
        ([2, 128, 7, 7], 128, 3, 1, 1, true),
        ([1, 128, 5, 5], 144, 3, 1, 1, true),
        ([3, 130, 4, 6], 136, 3, 1, 1, true),
        ([2, 128, 9, 3], 129, 3, 1, 1, true),
        ([2, 128, 1, 1], 128, 3, 1, 1, true),
        ([13, 64, 14, 14], 72, 3, 1, 1, true),
        ([2, 64, 13, 15], 64, 3, 1, 1, false),
        ([2, 128, 5, 5], 48, 3, 1, 1, false),
    ];
    for (si, &(xs, o, k, s, p, wino)) in shapes.iter().enumerate() {
        let g = geometry(xs, o, k, s, p);
        assert_eq!(winograd::fits(&g), wino, "shape {si}: {g:?}");
        let x = values(g.n * g.image(), 230 + si as u64);
        let w = values(g.o * g.patch(), 240 + si as u64);
        let dy = values(g.n * g.o * g.pixels(), 250 + si as u64);
        let want = naive_dw(&x, &dy, &g);
        for schedule in [ConvSchedule::PerItem, ConvSchedule::Grouped { items: 2 }] {
            let what = format!("shape {si}, {schedule:?}");
            let got = conv2d_backward_cpu_with(&x, &w, &dy, &g, [true; 3], schedule).unwrap();
            assert_close(got.weight.as_ref().unwrap(), &want, 1e-4, &what);
            let lowered =
                conv2d_backward_cpu_lowered(&x, &w, &dy, &g, [true; 3], schedule).unwrap();
            assert_close(
                got.x.as_ref().unwrap(),
                lowered.x.as_ref().unwrap(),
                1e-4,
                &what,
            );
            assert_eq!(got.bias, lowered.bias, "{what}");
            let only_w =
                conv2d_backward_cpu_with(&x, &w, &dy, &g, [false, true, false], schedule).unwrap();
            assert_eq!(only_w.weight, got.weight, "{what}");
            assert!(only_w.x.is_none() && only_w.bias.is_none(), "{what}");
        }
        if wino && avx512_active() {
            let run = |lanes: bool| winograd::weight_gradient_lanes(&x, &dy, &g, lanes).unwrap();
            assert_eq!(run(true), run(false), "shape {si}: lanes against baseline");
        }
    }
}

/// Finite differences through the tape for a convolution that runs by Winograd (forward,
/// input and weight gradients; an odd image, a bias).
#[test]
fn winograd_matches_finite_differences() {
    let (xs, o) = ([2, 128, 5, 3], 128);
    let g = geometry(xs, o, 3, 1, 1);
    assert!(winograd::fits(&g));
    let x = crate::Tensor::f32(values(g.n * g.image(), 260), &xs).unwrap();
    let w = crate::Tensor::f32(values(g.o * g.patch(), 261), &[o, xs[1], 3, 3]).unwrap();
    let b = crate::Tensor::f32(values(o, 262), &[o]).unwrap();
    GradCheck::default()
        .run(&[x, w, b], &[0, 1, 2], |tape, v| {
            conv2d(
                tape,
                &v[0],
                &v[1],
                Some(&v[2]),
                Conv2dOptions {
                    stride: 1,
                    padding: 1,
                },
            )
        })
        .unwrap();
}
