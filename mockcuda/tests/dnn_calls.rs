//! cuDNN through its entry points on device memory, as the engine drives it: descriptors, the
//! `_v7` heuristic, the first deterministic algorithm, a workspace, the three directions queued
//! on the handle's stream; each checked against a plain loop of its definition.

mod common;

use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

use mockcuda::dnn::desc::{DATA_FLOAT, FMA_MATH, SUCCESS};
use mockcuda::dnn::*;
use mockcuda::driver::cuCtxSynchronize;

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 17 + seed * 5) % 11) as f32 / 4.0 - 1.25)
        .collect()
}

// x [N, C, H, W], w [K, C, R, S], stride 2, padding 1, cross-correlation.
const N: usize = 2;
const C: usize = 3;
const H: usize = 7;
const W: usize = 6;
const K: usize = 4;
const R: usize = 3;
const S: usize = 3;
const P: usize = (H + 2 - R) / 2 + 1;
const Q: usize = (W + 2 - S) / 2 + 1;

/// The input position of output `o` and tap `t` (stride 2, padding 1), if inside `size`.
fn pos(o: usize, t: usize, size: usize) -> Option<usize> {
    let p = (o * 2 + t) as isize - 1;
    (p >= 0 && (p as usize) < size).then_some(p as usize)
}

fn xi(n: usize, c: usize, h: usize, w: usize) -> usize {
    ((n * C + c) * H + h) * W + w
}
fn wi(k: usize, c: usize, r: usize, s: usize) -> usize {
    ((k * C + c) * R + r) * S + s
}
fn yi(n: usize, k: usize, p: usize, q: usize) -> usize {
    ((n * K + k) * P + p) * Q + q
}

/// Every (x, w, y) index triple of a product term of the definition.
fn terms() -> Vec<(usize, usize, usize)> {
    let mut t = vec![];
    for n in 0..N {
        for k in 0..K {
            for p in 0..P {
                for q in 0..Q {
                    for c in 0..C {
                        for r in 0..R {
                            for s in 0..S {
                                if let (Some(h), Some(w)) = (pos(p, r, H), pos(q, s, W)) {
                                    t.push((xi(n, c, h, w), wi(k, c, r, s), yi(n, k, p, q)));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    t
}

unsafe fn best(perfs: &[AlgoPerf], n: c_int) -> AlgoPerf {
    *perfs[..n as usize]
        .iter()
        .find(|p| p.status == SUCCESS && p.determinism == 1)
        .expect("a deterministic algorithm")
}

#[test]
fn forward_and_both_backward_directions_on_a_stream_match_the_definitions() {
    common::init();
    let s = common::non_blocking_stream();
    let (xv, wv, yv) = (
        vals(N * C * H * W, 1),
        vals(K * C * R * S, 2),
        vals(N * K * P * Q, 3),
    );
    let x = common::alloc_async(xv.len() * 4, s);
    let w = common::alloc_async(wv.len() * 4, s);
    let y = common::alloc_async(yv.len() * 4, s);
    let ws = common::alloc_async(1 << 20, s);
    common::upload(x, &xv, s);
    common::upload(w, &wv, s);
    common::upload(y, &yv, s);
    unsafe {
        let (mut h, mut xd, mut wd, mut yd, mut cd) =
            (null_mut(), null_mut(), null_mut(), null_mut(), null_mut());
        assert_eq!(cudnnCreate(&mut h), SUCCESS);
        assert_eq!(cudnnSetStream(h, s), SUCCESS);
        assert_eq!(cudnnCreateTensorDescriptor(&mut xd), SUCCESS);
        assert_eq!(cudnnCreateTensorDescriptor(&mut yd), SUCCESS);
        assert_eq!(cudnnCreateFilterDescriptor(&mut wd), SUCCESS);
        assert_eq!(cudnnCreateConvolutionDescriptor(&mut cd), SUCCESS);
        assert_eq!(
            cudnnSetTensor4dDescriptor(
                xd, 0, DATA_FLOAT, N as c_int, C as c_int, H as c_int, W as c_int
            ),
            SUCCESS
        );
        assert_eq!(
            cudnnSetTensor4dDescriptor(
                yd, 0, DATA_FLOAT, N as c_int, K as c_int, P as c_int, Q as c_int
            ),
            SUCCESS
        );
        assert_eq!(
            cudnnSetFilter4dDescriptor(
                wd, DATA_FLOAT, 0, K as c_int, C as c_int, R as c_int, S as c_int
            ),
            SUCCESS
        );
        assert_eq!(
            cudnnSetConvolution2dDescriptor(cd, 1, 1, 2, 2, 1, 1, 1, DATA_FLOAT),
            SUCCESS
        );
        assert_eq!(cudnnSetConvolutionMathType(cd, FMA_MATH), SUCCESS);
        let mut perfs = [AlgoPerf {
            algo: 0,
            status: 0,
            time: 0.0,
            memory: 0,
            determinism: 0,
            math_type: 0,
            reserved: [0; 3],
        }; 8];
        let mut n = 0;
        let (one, zero, half) = (1f32, 0f32, 0.5f32);
        let f = |v: &f32| v as *const f32 as *const c_void;

        // Forward: y = x * w.
        assert_eq!(
            cudnnGetConvolutionForwardAlgorithm_v7(
                h,
                xd,
                wd,
                cd,
                yd,
                8,
                &mut n,
                perfs.as_mut_ptr()
            ),
            SUCCESS
        );
        let a = best(&perfs, n);
        let st = cudnnConvolutionForward(
            h,
            f(&one),
            xd,
            x as *const c_void,
            wd,
            w as *const c_void,
            cd,
            a.algo,
            ws as *mut c_void,
            1 << 20,
            f(&zero),
            yd,
            y as *mut c_void,
        );
        assert_eq!(st, SUCCESS);
        let got = common::download(y, yv.len(), s);
        let want = forward_of(&xv, &wv);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-5, "y[{i}] = {g}, want {w}");
        }

        // Backward data with beta = 0.5: dx = dy (*) w + 0.5 dx, dy being the y just computed.
        let dx0 = common::download(x, xv.len(), s);
        assert_eq!(
            cudnnGetConvolutionBackwardDataAlgorithm_v7(
                h,
                wd,
                yd,
                cd,
                xd,
                8,
                &mut n,
                perfs.as_mut_ptr()
            ),
            SUCCESS
        );
        let a = best(&perfs, n);
        let st = cudnnConvolutionBackwardData(
            h,
            f(&one),
            wd,
            w as *const c_void,
            yd,
            y as *const c_void,
            cd,
            a.algo,
            ws as *mut c_void,
            1 << 20,
            f(&half),
            xd,
            x as *mut c_void,
        );
        assert_eq!(st, SUCCESS);
        let got = common::download(x, xv.len(), s);
        let dy = forward_of(&xv, &wv);
        let mut want: Vec<f32> = dx0.iter().map(|v| 0.5 * v).collect();
        for (xi, wi, yi) in terms() {
            want[xi] += dy[yi] * wv[wi];
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "dx[{i}] = {g}, want {w}"
            );
        }

        // Backward filter: dw = x^T (*) dy, with the x just written and dy = y.
        assert_eq!(
            cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                h,
                xd,
                yd,
                cd,
                wd,
                8,
                &mut n,
                perfs.as_mut_ptr()
            ),
            SUCCESS
        );
        let a = best(&perfs, n);
        let mut size = 0;
        assert_eq!(
            cudnnGetConvolutionBackwardFilterWorkspaceSize(h, xd, yd, cd, wd, a.algo, &mut size),
            SUCCESS
        );
        assert_eq!(size, a.memory);
        let st = cudnnConvolutionBackwardFilter(
            h,
            f(&one),
            xd,
            x as *const c_void,
            yd,
            y as *const c_void,
            cd,
            a.algo,
            ws as *mut c_void,
            1 << 20,
            f(&zero),
            wd,
            w as *mut c_void,
        );
        assert_eq!(st, SUCCESS);
        let got_w = common::download(w, wv.len(), s);
        let x_now = got;
        let mut want = vec![0f32; wv.len()];
        for (xi, wi, yi) in terms() {
            want[wi] += x_now[xi] * dy[yi];
        }
        for (i, (g, w)) in got_w.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "dw[{i}] = {g}, want {w}"
            );
        }
        assert_eq!(cudnnDestroy(h), SUCCESS);
    }
    assert_eq!(cuCtxSynchronize(), mockcuda::driver::SUCCESS);
}

/// The forward output for `x`, `w` by the definition (also the dy of the backward checks).
fn forward_of(xv: &[f32], wv: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; N * K * P * Q];
    for (xi, wi, yi) in terms() {
        y[yi] += xv[xi] * wv[wi];
    }
    y
}
