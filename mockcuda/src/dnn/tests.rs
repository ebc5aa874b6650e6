//! cuDNN's three directions against plain loops written from the definitions (each in its own
//! gather form), and the descriptors' and queries' documented statuses.

use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

use super::compute::{self, Geometry, Tensor4};
use super::desc::*;
use super::*;
use crate::libcommon::Elem;

fn value(i: usize, seed: usize) -> f32 {
    (((i * 2_654_435_761 + seed * 131) >> 5) % 19) as f32 / 8.0 - 1.125
}

fn fill(t: &Tensor4, seed: usize) -> Vec<u8> {
    let mut b = vec![0u8; t.span_bytes()];
    for i in 0..b.len() / t.elem.size() {
        t.elem.store(&mut b, i, value(i, seed));
    }
    b
}

/// Element `[a, b, c, d]` of a described tensor.
fn at(t: &Tensor4, bytes: &[u8], i: [usize; 4]) -> f64 {
    let off: usize = (0..4).map(|d| i[d] * t.strides[d]).sum();
    t.elem.load(bytes, off) as f64
}

/// The filter tap applied at `(r, s)`: flipped for CUDNN_CONVOLUTION.
fn tap(g: &Geometry, r: usize, s: usize) -> (usize, usize) {
    if g.flip {
        (g.w[2] - 1 - r, g.w[3] - 1 - s)
    } else {
        (r, s)
    }
}

/// `y[n,k,p,q] = sum_{c,r,s} x[n, g*Cg+c, p*u - pad + r*dil, q*v - pad + s*dil] w[k,c,r,s]`.
fn forward_ref(g: &Geometry, x: &Tensor4, xb: &[u8], w: &Tensor4, wb: &[u8]) -> Vec<f64> {
    let [n, _, h, wd] = g.x;
    let [k, cg, r, s] = g.w;
    let [_, _, p, q] = g.y;
    let mut out = vec![];
    for ni in 0..n {
        for ki in 0..k {
            let grp = ki / (k / g.groups);
            for pi in 0..p {
                for qi in 0..q {
                    let mut sum = 0f64;
                    for ci in 0..cg {
                        for ri in 0..r {
                            for si in 0..s {
                                let hh = (pi * g.stride[0] + ri * g.dilation[0]) as isize
                                    - g.pad[0] as isize;
                                let ww = (qi * g.stride[1] + si * g.dilation[1]) as isize
                                    - g.pad[1] as isize;
                                if hh < 0 || ww < 0 || hh as usize >= h || ww as usize >= wd {
                                    continue;
                                }
                                let (rr, ss) = tap(g, ri, si);
                                sum += at(x, xb, [ni, grp * cg + ci, hh as usize, ww as usize])
                                    * at(w, wb, [ki, ci, rr, ss]);
                            }
                        }
                    }
                    out.push(sum);
                }
            }
        }
    }
    out
}

/// `dx[n,ch,h,w] = sum over k of ch's group and taps (r, s) whose output position
/// `((h + pad - r*dil) / u, ...)` is whole and inside: dy[n,k,p,q] w[k, ch - g*Cg, r, s]`.
fn backward_data_ref(g: &Geometry, w: &Tensor4, wb: &[u8], dy: &Tensor4, dyb: &[u8]) -> Vec<f64> {
    let [n, c, h, wd] = g.x;
    let [k, cg, r, s] = g.w;
    let [_, _, p, q] = g.y;
    let kg = k / g.groups;
    let pos = |o: usize, t: usize, a: usize, lim: usize| {
        let num = (o + g.pad[a]) as isize - (t * g.dilation[a]) as isize;
        (num >= 0
            && (num as usize).is_multiple_of(g.stride[a])
            && (num as usize / g.stride[a]) < lim)
            .then(|| num as usize / g.stride[a])
    };
    let mut out = vec![];
    for ni in 0..n {
        for ch in 0..c {
            let grp = ch / cg;
            for hi in 0..h {
                for wi in 0..wd {
                    let mut sum = 0f64;
                    for ki in grp * kg..(grp + 1) * kg {
                        for ri in 0..r {
                            for si in 0..s {
                                let (Some(pi), Some(qi)) = (pos(hi, ri, 0, p), pos(wi, si, 1, q))
                                else {
                                    continue;
                                };
                                let (rr, ss) = tap(g, ri, si);
                                sum += at(dy, dyb, [ni, ki, pi, qi])
                                    * at(w, wb, [ki, ch - grp * cg, rr, ss]);
                            }
                        }
                    }
                    out.push(sum);
                }
            }
        }
    }
    out
}

/// `dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] x[n, g*Cg+c, p*u - pad + r*dil, ...]` (at the
/// flipped tap for CUDNN_CONVOLUTION).
fn backward_filter_ref(g: &Geometry, x: &Tensor4, xb: &[u8], dy: &Tensor4, dyb: &[u8]) -> Vec<f64> {
    let [n, _, h, wd] = g.x;
    let [k, cg, r, s] = g.w;
    let [_, _, p, q] = g.y;
    let mut out = vec![0f64; k * cg * r * s];
    for ki in 0..k {
        let grp = ki / (k / g.groups);
        for ci in 0..cg {
            for ri in 0..r {
                for si in 0..s {
                    let mut sum = 0f64;
                    for ni in 0..n {
                        for pi in 0..p {
                            for qi in 0..q {
                                let hh = (pi * g.stride[0] + ri * g.dilation[0]) as isize
                                    - g.pad[0] as isize;
                                let ww = (qi * g.stride[1] + si * g.dilation[1]) as isize
                                    - g.pad[1] as isize;
                                if hh < 0 || ww < 0 || hh as usize >= h || ww as usize >= wd {
                                    continue;
                                }
                                sum += at(dy, dyb, [ni, ki, pi, qi])
                                    * at(x, xb, [ni, grp * cg + ci, hh as usize, ww as usize]);
                            }
                        }
                    }
                    let (rr, ss) = tap(g, ri, si);
                    out[((ki * cg + ci) * r + rr) * s + ss] = sum;
                }
            }
        }
    }
    out
}

/// Compares a blended output (`alpha * want + beta * old`) element by element, NCHW order.
#[allow(clippy::too_many_arguments)]
fn check(
    t: &Tensor4,
    got: &[u8],
    old: &[u8],
    want: &[f64],
    alpha: f64,
    beta: f64,
    tol: f64,
    what: &str,
) {
    let [a, b, c, d] = t.dims;
    let mut i = 0;
    for n in 0..a {
        for ch in 0..b {
            for y in 0..c {
                for x in 0..d {
                    let w = alpha * want[i]
                        + if beta != 0.0 {
                            beta * at(t, old, [n, ch, y, x])
                        } else {
                            0.0
                        };
                    let g = at(t, got, [n, ch, y, x]);
                    assert!(
                        (g - w).abs() <= tol * (1.0 + w.abs()),
                        "{what} [{n},{ch},{y},{x}] = {g}, want {w}"
                    );
                    i += 1;
                }
            }
        }
    }
}

#[test]
fn the_three_directions_follow_the_definitions() {
    let mut cases = 0;
    for elem in [Elem::F32, Elem::Bf16] {
        for (groups, stride, pad, dilation) in
            [(1, 1, 0, 1), (2, 2, 1, 1), (1, 2, 2, 2), (2, 1, 1, 2)]
        {
            for flip in [false, true] {
                for nhwc_x in [false, true] {
                    let (n, c, h, w, k, r, s) = (2, 4, 7, 6, 4, 3, 2);
                    let p = Geometry::out_size(h, r, pad, stride, dilation).unwrap();
                    let q = Geometry::out_size(w, s, pad, stride, dilation).unwrap();
                    let g = Geometry {
                        x: [n, c, h, w],
                        w: [k, c / groups, r, s],
                        y: [n, k, p, q],
                        pad: [pad; 2],
                        stride: [stride; 2],
                        dilation: [dilation; 2],
                        groups,
                        flip,
                    };
                    let xt = if nhwc_x {
                        Tensor4::nhwc(elem, g.x)
                    } else {
                        Tensor4::nchw(elem, g.x)
                    };
                    let wt = Tensor4::nchw(elem, g.w);
                    // y with padded strides (a descriptor set with the Ex form).
                    let yt = Tensor4 {
                        elem,
                        dims: g.y,
                        strides: [k * p * q + 5, p * q + 1, q, 1],
                    };
                    let (xb, wb, yb) = (fill(&xt, 1), fill(&wt, 2), fill(&yt, 3));
                    let tol = if elem == Elem::Bf16 { 1.0 / 64.0 } else { 1e-5 };
                    for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, -2.0)] {
                        // Forward.
                        let y =
                            compute::forward(&g, &xt.gather(&xb, false), &wt.gather(&wb, false));
                        let mut out = yb.clone();
                        yt.blend(&y, alpha, beta, &mut out);
                        check(
                            &yt,
                            &out,
                            &yb,
                            &forward_ref(&g, &xt, &xb, &wt, &wb),
                            alpha as f64,
                            beta as f64,
                            tol,
                            "forward",
                        );
                        // Backward data, deterministic and rotated (ALGO_0's order).
                        for rotate in [0, 3] {
                            let dx = compute::backward_data(
                                &g,
                                &wt.gather(&wb, false),
                                &yt.gather(&yb, false),
                                rotate,
                            );
                            let mut out = xb.clone();
                            xt.blend(&dx, alpha, beta, &mut out);
                            check(
                                &xt,
                                &out,
                                &xb,
                                &backward_data_ref(&g, &wt, &wb, &yt, &yb),
                                alpha as f64,
                                beta as f64,
                                tol,
                                "backward data",
                            );
                            let dw = compute::backward_filter(
                                &g,
                                &xt.gather(&xb, false),
                                &yt.gather(&yb, false),
                                rotate,
                            );
                            let mut out = wb.clone();
                            wt.blend(&dw, alpha, beta, &mut out);
                            check(
                                &wt,
                                &out,
                                &wb,
                                &backward_filter_ref(&g, &xt, &xb, &yt, &yb),
                                alpha as f64,
                                beta as f64,
                                tol,
                                "backward filter",
                            );
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 2 * 4 * 2 * 2 * 2);
}

#[test]
fn math_types_decide_tf32_for_fp32_data() {
    let t = Tensor4::nchw(Elem::F32, [1, 1, 1, 1]);
    let g = Geometry {
        x: [1, 1, 1, 1],
        w: [1, 1, 1, 1],
        y: [1, 1, 1, 1],
        pad: [0; 2],
        stride: [1; 2],
        dilation: [1; 2],
        groups: 1,
        flip: false,
    };
    let p = |math, elem| Problem {
        x: Tensor4 { elem, ..t },
        w: t,
        y: t,
        geometry: g,
        math,
    };
    assert!(!p(FMA_MATH, Elem::F32).tf32());
    if std::env::var("NVIDIA_TF32_OVERRIDE").map_or(true, |v| v != "0") {
        assert!(p(DEFAULT_MATH, Elem::F32).tf32());
        assert!(p(TENSOR_OP_MATH, Elem::F32).tf32());
    }
    assert!(!p(TENSOR_OP_MATH, Elem::Bf16).tf32());
    let mut b = vec![0u8; 4];
    Elem::F32.store(&mut b, 0, 1.0 + 2f32.powi(-12));
    assert_eq!(t.gather(&b, true), vec![1.0]);
    assert_eq!(t.gather(&b, false), vec![1.0 + 2f32.powi(-12)]);
}

// The entry points (their checks need no device memory).

struct Descs {
    handle: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    y: *mut c_void,
    conv: *mut c_void,
}

/// x [2, 4, 8, 8], w [6, 4, 3, 3], stride 2, pad 1: y [2, 6, 4, 4]; `dtype` for all three.
unsafe fn descs(dtype: u32) -> Descs {
    let mut d = Descs {
        handle: null_mut(),
        x: null_mut(),
        w: null_mut(),
        y: null_mut(),
        conv: null_mut(),
    };
    assert_eq!(cudnnCreate(&mut d.handle), SUCCESS);
    assert_eq!(cudnnCreateTensorDescriptor(&mut d.x), SUCCESS);
    assert_eq!(cudnnCreateTensorDescriptor(&mut d.y), SUCCESS);
    assert_eq!(cudnnCreateFilterDescriptor(&mut d.w), SUCCESS);
    assert_eq!(cudnnCreateConvolutionDescriptor(&mut d.conv), SUCCESS);
    assert_eq!(
        cudnnSetTensor4dDescriptor(d.x, 0, dtype, 2, 4, 8, 8),
        SUCCESS
    );
    assert_eq!(
        cudnnSetFilter4dDescriptor(d.w, dtype, 0, 6, 4, 3, 3),
        SUCCESS
    );
    assert_eq!(
        cudnnSetConvolution2dDescriptor(d.conv, 1, 1, 2, 2, 1, 1, 1, DATA_FLOAT),
        SUCCESS
    );
    assert_eq!(
        cudnnSetTensor4dDescriptor(d.y, 0, dtype, 2, 6, 4, 4),
        SUCCESS
    );
    d
}

#[test]
fn output_dims_and_descriptor_checks() {
    unsafe {
        let d = descs(DATA_FLOAT);
        let mut o = [0 as c_int; 4];
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(
                d.conv, d.x, d.w, &mut o[0], &mut o[1], &mut o[2], &mut o[3]
            ),
            SUCCESS
        );
        assert_eq!(o, [2, 6, 4, 4]);
        let mut nd = [0 as c_int; 4];
        assert_eq!(
            cudnnGetConvolutionNdForwardOutputDim(d.conv, d.x, d.w, 4, nd.as_mut_ptr()),
            SUCCESS
        );
        assert_eq!(nd, o);
        // Dilation 2 grows the filter to 5x5: (8 + 2 - 5) / 2 + 1 = 3.
        let (pad, stride, dil) = ([1, 1], [2, 2], [2, 2]);
        assert_eq!(
            cudnnSetConvolutionNdDescriptor(
                d.conv,
                2,
                pad.as_ptr(),
                stride.as_ptr(),
                dil.as_ptr(),
                1,
                DATA_FLOAT
            ),
            SUCCESS
        );
        cudnnGetConvolution2dForwardOutputDim(
            d.conv, d.x, d.w, &mut o[0], &mut o[1], &mut o[2], &mut o[3],
        );
        assert_eq!(o, [2, 6, 3, 3]);
        // Two groups need a filter of 2 input channels.
        assert_eq!(cudnnSetConvolutionGroupCount(d.conv, 2), SUCCESS);
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(
                d.conv, d.x, d.w, &mut o[0], &mut o[1], &mut o[2], &mut o[3]
            ),
            BAD_PARAM
        );
        assert_eq!(
            cudnnSetFilter4dDescriptor(d.w, DATA_FLOAT, 0, 6, 2, 3, 3),
            SUCCESS
        );
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(
                d.conv, d.x, d.w, &mut o[0], &mut o[1], &mut o[2], &mut o[3]
            ),
            SUCCESS
        );
        // Bad values are refused where they are set.
        assert_eq!(
            cudnnSetTensor4dDescriptor(d.x, 0, DATA_FLOAT, 2, 0, 8, 8),
            BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(d.conv, -1, 0, 1, 1, 1, 1, 1, DATA_FLOAT),
            BAD_PARAM
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(d.conv, 0, 0, 0, 1, 1, 1, 1, DATA_FLOAT),
            BAD_PARAM
        );
        assert_eq!(cudnnSetConvolutionGroupCount(d.conv, 0), BAD_PARAM);
        assert_eq!(cudnnSetConvolutionMathType(d.conv, 7), BAD_PARAM);
        // A filter larger than the padded input.
        assert_eq!(
            cudnnSetConvolution2dDescriptor(d.conv, 0, 0, 1, 1, 1, 1, 1, DATA_FLOAT),
            SUCCESS
        );
        assert_eq!(cudnnSetConvolutionGroupCount(d.conv, 1), SUCCESS);
        assert_eq!(
            cudnnSetFilter4dDescriptor(d.w, DATA_FLOAT, 0, 6, 4, 9, 3),
            SUCCESS
        );
        assert_eq!(
            cudnnGetConvolution2dForwardOutputDim(
                d.conv, d.x, d.w, &mut o[0], &mut o[1], &mut o[2], &mut o[3]
            ),
            BAD_PARAM
        );
        assert_eq!(cudnnDestroyTensorDescriptor(d.x), SUCCESS);
        assert_eq!(cudnnDestroyTensorDescriptor(d.x), BAD_PARAM);
        assert_eq!(cudnnDestroy(d.handle), SUCCESS);
    }
}

unsafe fn fwd_v7(d: &Descs) -> (Status, Vec<AlgoPerf>) {
    let mut perfs = [AlgoPerf {
        algo: 99,
        status: 99,
        time: 0.0,
        memory: 0,
        determinism: 9,
        math_type: 9,
        reserved: [0; 3],
    }; 8];
    let mut n = 0;
    let st = cudnnGetConvolutionForwardAlgorithm_v7(
        d.handle,
        d.x,
        d.w,
        d.conv,
        d.y,
        8,
        &mut n,
        perfs.as_mut_ptr(),
    );
    (st, perfs[..n as usize].to_vec())
}

#[test]
fn algorithm_queries_report_valid_algorithms_and_workspaces() {
    unsafe {
        let d = descs(DATA_BFLOAT16);
        assert_eq!(cudnnSetConvolutionMathType(d.conv, TENSOR_OP_MATH), SUCCESS);
        let (st, perfs) = fwd_v7(&d);
        assert_eq!(st, SUCCESS);
        assert_eq!(perfs.len(), 8);
        let mut max = 0;
        assert_eq!(
            cudnnGetConvolutionForwardAlgorithmMaxCount(d.handle, &mut max),
            SUCCESS
        );
        assert_eq!(max, 8);
        // Every algorithm once; the supported ones first, with the descriptor's math type and
        // workspace sizes the size query repeats.
        let mut algos: Vec<u32> = perfs.iter().map(|p| p.algo).collect();
        algos.sort();
        assert_eq!(algos, (0..8).collect::<Vec<_>>());
        assert_eq!(perfs[0].status, SUCCESS);
        for p in &perfs {
            let mut size = usize::MAX;
            let st = cudnnGetConvolutionForwardWorkspaceSize(
                d.handle, d.x, d.w, d.conv, d.y, p.algo, &mut size,
            );
            if p.status == SUCCESS {
                assert_eq!((st, size, p.math_type), (SUCCESS, p.memory, TENSOR_OP_MATH));
            } else {
                assert_eq!(st, NOT_SUPPORTED);
            }
        }
        // Backward: the first-ranked algorithms are the non-deterministic ones, a
        // deterministic one follows.
        let mut perfs = [perfs[0]; 8];
        let mut n = 0;
        assert_eq!(
            cudnnGetConvolutionBackwardDataAlgorithm_v7(
                d.handle,
                d.w,
                d.y,
                d.conv,
                d.x,
                8,
                &mut n,
                perfs.as_mut_ptr()
            ),
            SUCCESS
        );
        assert_eq!(n, 6);
        assert_eq!(
            (perfs[0].determinism, perfs[1].determinism, perfs[1].status),
            (0, 1, SUCCESS)
        );
        assert_eq!(
            cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                d.handle,
                d.x,
                d.y,
                d.conv,
                d.w,
                2,
                &mut n,
                perfs.as_mut_ptr()
            ),
            SUCCESS
        );
        assert_eq!(n, 2);
        assert_eq!(
            (perfs[1].determinism, perfs[1].memory),
            (1, 6 * 4 * 3 * 3 * 4)
        );
        let mut size = 0;
        assert_eq!(
            cudnnGetConvolutionBackwardFilterWorkspaceSize(
                d.handle, d.x, d.y, d.conv, d.w, 1, &mut size
            ),
            SUCCESS
        );
        assert_eq!(size, perfs[1].memory);
        // A wrong output shape, mixed types, a bf16 compute type: refused.
        assert_eq!(
            cudnnSetTensor4dDescriptor(d.y, 0, DATA_BFLOAT16, 2, 6, 4, 5),
            SUCCESS
        );
        assert_eq!(fwd_v7(&d).0, BAD_PARAM);
        assert_eq!(
            cudnnSetTensor4dDescriptor(d.y, 0, DATA_FLOAT, 2, 6, 4, 4),
            SUCCESS
        );
        assert_eq!(fwd_v7(&d).0, BAD_PARAM);
        assert_eq!(
            cudnnSetTensor4dDescriptor(d.y, 0, DATA_BFLOAT16, 2, 6, 4, 4),
            SUCCESS
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(d.conv, 1, 1, 2, 2, 1, 1, 1, DATA_BFLOAT16),
            SUCCESS
        );
        assert_eq!(fwd_v7(&d).0, NOT_SUPPORTED);
    }
}

#[test]
fn a_call_checks_its_algorithm_and_workspace() {
    unsafe {
        let d = descs(DATA_FLOAT);
        let (_, p) = lookup(d.handle, d.x, d.w, d.conv, d.y).unwrap();
        let ptrs = Ptrs {
            x: 0x7000_0000_0000,
            w: 0x7000_0001_0000,
            y: 0x7000_0002_0000,
            workspace: 0,
            workspace_size: 0,
        };
        // IMPLICIT_GEMM needs no workspace; IMPLICIT_PRECOMP_GEMM does.
        assert!(check_call(Direction::Forward, &p, 0, &ptrs).is_ok());
        let e = check_call(Direction::Forward, &p, 1, &ptrs).unwrap_err();
        assert_eq!(e.0, BAD_PARAM, "{}", e.1);
        let with_ws = Ptrs {
            workspace: 0x7000_0003_0000,
            workspace_size: 1 << 20,
            ..ptrs
        };
        assert!(check_call(Direction::Forward, &p, 1, &with_ws).is_ok());
        // FFT is not run by the mock.
        assert_eq!(
            check_call(Direction::Forward, &p, 4, &with_ws)
                .unwrap_err()
                .0,
            NOT_SUPPORTED
        );
        // A null workspace with a size.
        let null_ws = Ptrs {
            workspace: 0,
            workspace_size: 64,
            ..ptrs
        };
        assert_eq!(
            check_call(Direction::Forward, &p, 0, &null_ws)
                .unwrap_err()
                .0,
            BAD_PARAM
        );
        // Stream binding.
        let mut s = null_mut();
        assert_eq!(cudnnSetStream(d.handle, 0x1234 as *mut c_void), SUCCESS);
        assert_eq!(cudnnGetStream(d.handle, &mut s), SUCCESS);
        assert_eq!(s as usize, 0x1234);
        assert_eq!(cudnnGetVersion(), 9_02_01);
        assert!(status_name(BAD_PARAM).starts_with("CUDNN_STATUS_BAD_PARAM"));
    }
}
