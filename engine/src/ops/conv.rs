//! 2-D convolution (NCHW, groups 1, dilation 1) on the tape: one forward and one backward for
//! every device. The work is done by the backend-level functions of `crate::backend::conv`
//! (CPU arm and CUDA arm beneath them), which also hold the kernels, their schedules and the
//! numerics.

pub use crate::backend::{Conv2dGeometry, Conv2dOptions};

use crate::backend::conv::{conv2d_bwd, conv2d_fwd};
use crate::{Result, Tape, Var};

/// `conv2d(x [N, C, H, W], weight [O, C, kh, kw], bias [O]) -> [N, O, OH, OW]` with
/// `OH = (H + 2 padding - kh) / stride + 1` (PyTorch's `F.conv2d`, groups 1, dilation 1).
pub fn conv2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: Option<&Var>,
    opts: Conv2dOptions,
) -> Result<Var> {
    x.tensor().expect_float("conv2d")?;
    weight.tensor().expect_float("conv2d")?;
    let g = Conv2dGeometry::new(x.shape(), weight.shape(), opts)?;
    let (out, operands) = conv2d_fwd(x.tensor(), weight.tensor(), bias.map(|b| b.tensor()), &g)?;
    let backward = Box::new(move |dy: &crate::Tensor, needs: &[bool]| {
        let need_b = needs.get(2).copied().unwrap_or(false);
        let [dx, dw, db] = conv2d_bwd(&operands, dy, &g, [needs[0], needs[1], need_b])?;
        let mut grads = vec![dx, dw];
        if needs.len() == 3 {
            grads.push(db);
        }
        Ok(grads)
    });
    Ok(match bias {
        Some(b) => tape.record(out, &[x, weight, b], backward),
        None => tape.record(out, &[x, weight], backward),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conv::*;
    use crate::backend::gemm::{bf16_products_active, SERIAL_GEMM_AVAILABLE};
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device, Tensor};
    use half::bf16;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn opts(stride: usize, padding: usize) -> Conv2dOptions {
        Conv2dOptions { stride, padding }
    }

    /// Direct seven-loop convolution in f64.
    fn naive_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &Conv2dGeometry) -> Vec<f32> {
        let mut out = vec![0f32; g.n * g.o * g.pixels()];
        for n in 0..g.n {
            for o in 0..g.o {
                for oh in 0..g.oh {
                    for ow in 0..g.ow {
                        let mut s = b.map_or(0.0, |b| b[o] as f64);
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let ih = (oh * g.stride + i) as isize - g.padding as isize;
                                    let iw = (ow * g.stride + j) as isize - g.padding as isize;
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * g.c + c) * g.h + ih as usize) * g.w + iw as usize];
                                    let wv = w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((n * g.o + o) * g.oh + oh) * g.ow + ow] = s as f32;
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    /// (x shape, weight shape, stride, padding): 3x3 same, strided, padded strided, 1x1
    /// pointwise, 1x1 strided (ResNet downsample), 7x7 stride 2 (ResNet stem), non-square.
    const CASES: &[([usize; 4], [usize; 4], usize, usize)] = &[
        ([3, 4, 6, 6], [5, 4, 3, 3], 1, 1),
        ([3, 4, 7, 7], [5, 4, 3, 3], 2, 0),
        ([2, 3, 9, 8], [4, 3, 3, 3], 2, 1),
        ([3, 6, 5, 5], [4, 6, 1, 1], 1, 0),
        ([2, 6, 7, 7], [4, 6, 1, 1], 2, 0),
        ([2, 3, 15, 15], [4, 3, 7, 7], 2, 3),
        ([1, 2, 5, 7], [3, 2, 2, 3], 1, 2),
        // Small images in a larger batch: groups of several images, a partial last group.
        ([7, 3, 4, 4], [5, 3, 3, 3], 1, 1),
        ([9, 4, 3, 3], [6, 4, 1, 1], 1, 0),
    ];

    #[test]
    fn auto_groups_small_images_only() {
        let threads = rayon::current_num_threads();
        let g =
            |hw: usize| Conv2dGeometry::new(&[128, 8, hw, hw], &[8, 8, 3, 3], opts(1, 1)).unwrap();
        if SERIAL_GEMM_AVAILABLE && threads <= 128 {
            assert_eq!(ConvSchedule::auto(&g(28)), ConvSchedule::PerItem);
            // Groups of a size set by the shape and batch, not the thread count.
            let want = 16.min(128usize.div_ceil(8));
            let want = if want == 1 {
                ConvSchedule::PerItem
            } else {
                ConvSchedule::Grouped { items: want }
            };
            assert_eq!(ConvSchedule::auto(&g(4)), want);
        }
    }

    #[test]
    fn forward_matches_naive_for_every_schedule() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let (x, w, b) = (
                randn(&xs, 1 + k as u64),
                randn(&ws, 20),
                randn(&[ws[0]], 30),
            );
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let (xv, wv, bv) = (
                x.to_vec_f32().unwrap(),
                w.to_vec_f32().unwrap(),
                b.to_vec_f32().unwrap(),
            );
            let want = naive_forward(&xv, &wv, Some(&bv), &g);
            for sched in [
                ConvSchedule::PerItem,
                ConvSchedule::Grouped { items: 2 },
                ConvSchedule::Grouped { items: 3 },
                ConvSchedule::Batched { items: 1 },
                ConvSchedule::Batched { items: 2 },
            ] {
                let mut out = vec![f32::NAN; want.len()];
                conv2d_forward_cpu_with(&xv, &wv, Some(&bv), &g, &mut out, sched).unwrap();
                assert_close(&out, &want, 1e-4);
            }
            // Through the tape, without bias.
            let tape = Tape::inference();
            let y = conv2d(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(w.clone()),
                None,
                opts(s, p),
            )
            .unwrap();
            assert_eq!(y.shape(), &[g.n, g.o, g.oh, g.ow]);
            assert_close(
                &y.tensor().to_vec_f32().unwrap(),
                &naive_forward(&xv, &wv, None, &g),
                1e-4,
            );
        }
    }

    #[test]
    fn output_size_follows_pytorch() {
        let g = Conv2dGeometry::new(&[2, 3, 224, 224], &[64, 3, 7, 7], opts(2, 3)).unwrap();
        assert_eq!((g.oh, g.ow), (112, 112));
        let g = Conv2dGeometry::new(&[2, 64, 56, 56], &[128, 64, 1, 1], opts(2, 0)).unwrap();
        assert_eq!((g.oh, g.ow), (28, 28));
        let g = Conv2dGeometry::new(&[2, 64, 28, 28], &[64, 64, 3, 3], opts(1, 1)).unwrap();
        assert_eq!((g.oh, g.ow), (28, 28));
    }

    #[test]
    fn backward_schedules_agree() {
        // The tape uses one schedule; both must give the same gradients.
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let (x, w, dy) = (randn(&xs, 40 + k as u64), randn(&ws, 50), {
                let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
                randn(&[g.n, g.o, g.oh, g.ow], 60)
            });
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let (xv, wv, dyv) = (
                x.to_vec_f32().unwrap(),
                w.to_vec_f32().unwrap(),
                dy.to_vec_f32().unwrap(),
            );
            let base =
                conv2d_backward_cpu_with(&xv, &wv, &dyv, &g, [true; 3], ConvSchedule::PerItem)
                    .unwrap();
            for sched in [
                ConvSchedule::Grouped { items: 2 },
                ConvSchedule::Grouped { items: 3 },
                ConvSchedule::Batched { items: 1 },
                ConvSchedule::Batched { items: 2 },
            ] {
                let other = conv2d_backward_cpu_with(&xv, &wv, &dyv, &g, [true; 3], sched).unwrap();
                assert_close(other.x.as_ref().unwrap(), base.x.as_ref().unwrap(), 1e-4);
                assert_close(
                    other.weight.as_ref().unwrap(),
                    base.weight.as_ref().unwrap(),
                    1e-4,
                );
                assert_close(
                    other.bias.as_ref().unwrap(),
                    base.bias.as_ref().unwrap(),
                    1e-4,
                );
            }
            let only_w = conv2d_backward_cpu_with(
                &xv,
                &wv,
                &dyv,
                &g,
                [false, true, false],
                ConvSchedule::PerItem,
            )
            .unwrap();
            assert!(only_w.x.is_none() && only_w.bias.is_none());
            assert_close(
                only_w.weight.as_ref().unwrap(),
                base.weight.as_ref().unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let inputs = [
                randn(&xs, 70 + k as u64),
                randn(&ws, 80),
                randn(&[ws[0]], 90),
            ];
            GradCheck::default()
                .run(&inputs, &[0, 1, 2], |tape, v| {
                    conv2d(tape, &v[0], &v[1], Some(&v[2]), opts(s, p))
                })
                .unwrap_or_else(|e| panic!("case {k}: {e}"));
        }
        // Frozen input image (the first layer): only weight and bias.
        let (xs, ws, s, p) = CASES[0];
        let inputs = [randn(&xs, 95), randn(&ws, 96)];
        GradCheck::default()
            .run(&inputs, &[1], |tape, v| {
                conv2d(tape, &v[0], &v[1], None, opts(s, p))
            })
            .unwrap();
    }

    #[test]
    fn input_gradient_is_skipped_for_constant_input() {
        let tape = Tape::recording();
        let x = tape.constant(randn(&[2, 3, 5, 5], 1));
        let w = tape.watch(randn(&[4, 3, 3, 3], 2));
        let y = conv2d(&tape, &x, &w, None, opts(1, 1)).unwrap();
        let dy = randn(y.shape(), 3);
        let grads = tape.backward_with(&y, dy).unwrap();
        assert_eq!(grads.get(&w).unwrap().shape(), &[4, 3, 3, 3]);
    }

    #[test]
    fn rejects_bad_shapes_and_options() {
        let tape = Tape::inference();
        let c = |s: &[usize]| tape.constant(randn(s, 1));
        let err = conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 5, 3, 3]),
            None,
            opts(1, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("conv2d") && err.contains("[2, 3, 8, 8]") && err.contains("[4, 5, 3, 3]"),
            "{err}"
        );
        let err = conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(0, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stride"), "{err}");
        assert!(conv2d(&tape, &c(&[3, 8, 8]), &c(&[4, 3, 3, 3]), None, opts(1, 0)).is_err());
        assert!(conv2d(&tape, &c(&[2, 3, 8, 8]), &c(&[4, 3, 3]), None, opts(1, 0)).is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 2, 2]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(1, 0)
        )
        .is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 2, 2]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(1, 1)
        )
        .is_ok());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 3, 3]),
            Some(&c(&[3])),
            opts(1, 0)
        )
        .is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 0, 3]),
            None,
            opts(1, 0)
        )
        .is_err());
    }

    /// A bf16 weight (a teacher's): bf16 products on the input rounded to bf16 where the CPU
    /// has them, the widened weight otherwise; both close to the naive convolution of the
    /// operands that path uses. Small images in a batch: grouped products.
    #[test]
    fn forward_with_bf16_weights() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let x = randn(&xs, 200 + k as u64);
            let w = randn(&ws, 210).cast(DType::BF16).unwrap();
            let b = randn(&[ws[0]], 220).cast(DType::BF16).unwrap();
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let tape = Tape::inference();
            let y = conv2d(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(w.clone()),
                Some(&tape.constant(b.clone())),
                opts(s, p),
            )
            .unwrap();
            let xv: Vec<f32> = x
                .to_vec_f32()
                .unwrap()
                .iter()
                .map(|&v| {
                    if bf16_products_active() {
                        bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect();
            let want = naive_forward(
                &xv,
                &w.to_vec_f32().unwrap(),
                Some(&b.to_vec_f32().unwrap()),
                &g,
            );
            assert_close(&y.tensor().to_vec_f32().unwrap(), &want, 1e-4);
        }
        assert!(conv2d_forward_bf16_cpu(
            &[0.0; 3],
            &[bf16::ZERO; 4],
            None,
            &Conv2dGeometry::new(&[1, 1, 2, 2], &[1, 1, 2, 2], opts(1, 0)).unwrap(),
            &mut [0.0; 1],
        )
        .is_err());
    }
}
