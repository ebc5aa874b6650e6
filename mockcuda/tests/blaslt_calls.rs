//! cuBLASLt through its entry points on device memory, as the engine drives it: descriptors,
//! the heuristic under the operands' alignments, a workspace, the product queued on a stream;
//! checked against a plain loop of the definition. A misaligned operand is refused.

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use mockcuda::blaslt::desc::{EPILOGUE_BIAS, NOT_SUPPORTED, SUCCESS};
use mockcuda::blaslt::*;
use mockcuda::driver::cuCtxSynchronize;

unsafe fn set(
    f: unsafe extern "C" fn(*mut c_void, u32, *const c_void, usize) -> u32,
    h: *mut c_void,
    attr: u32,
    v: &[u8],
) {
    assert_eq!(
        f(h, attr, v.as_ptr() as *const c_void, v.len()),
        SUCCESS,
        "attribute {attr}"
    );
}

struct Gemm {
    handle: *mut c_void,
    desc: *mut c_void,
    a: *mut c_void,
    b: *mut c_void,
    d: *mut c_void,
}

/// Column-major, batched: D (m x n) = A^T (A stored k x m) B (k x n) + bias, `batch` of each.
unsafe fn descriptors(m: u64, n: u64, k: u64, batch: i32) -> Gemm {
    let mut g = Gemm {
        handle: null_mut(),
        desc: null_mut(),
        a: null_mut(),
        b: null_mut(),
        d: null_mut(),
    };
    assert_eq!(cublasLtCreate(&mut g.handle), SUCCESS);
    assert_eq!(cublasLtMatmulDescCreate(&mut g.desc, 68, 0), SUCCESS);
    set(
        cublasLtMatmulDescSetAttribute,
        g.desc,
        3,
        &1i32.to_le_bytes(),
    );
    set(
        cublasLtMatmulDescSetAttribute,
        g.desc,
        7,
        &EPILOGUE_BIAS.to_le_bytes(),
    );
    for (l, rows, cols) in [(&mut g.a, k, m), (&mut g.b, k, n), (&mut g.d, m, n)] {
        assert_eq!(
            cublasLtMatrixLayoutCreate(l, 0, rows, cols, rows as i64),
            SUCCESS
        );
        set(
            cublasLtMatrixLayoutSetAttribute,
            *l,
            5,
            &batch.to_le_bytes(),
        );
        set(
            cublasLtMatrixLayoutSetAttribute,
            *l,
            6,
            &((rows * cols) as i64).to_le_bytes(),
        );
    }
    g
}

/// The heuristic's algorithm for operands at these addresses (alignments promised as the
/// engine computes them: the largest power of two dividing the address, at most 256).
unsafe fn algorithm(g: &Gemm, ptrs: [u64; 3]) -> HeuristicResult {
    let mut pref = null_mut();
    assert_eq!(cublasLtMatmulPreferenceCreate(&mut pref), SUCCESS);
    set(
        cublasLtMatmulPreferenceSetAttribute,
        pref,
        1,
        &(32u64 << 20).to_le_bytes(),
    );
    let align = |p: u64| 1u32 << p.trailing_zeros().min(8);
    for (attr, p) in [(5, ptrs[0]), (6, ptrs[1]), (7, ptrs[2]), (8, ptrs[2])] {
        set(
            cublasLtMatmulPreferenceSetAttribute,
            pref,
            attr,
            &align(p).to_le_bytes(),
        );
    }
    let mut r: HeuristicResult = std::mem::zeroed();
    let mut count = 0;
    let st = cublasLtMatmulAlgoGetHeuristic(
        g.handle, g.desc, g.a, g.b, g.d, g.d, pref, 1, &mut r, &mut count,
    );
    assert_eq!((st, count), (SUCCESS, 1));
    assert_eq!(cublasLtMatmulPreferenceDestroy(pref), SUCCESS);
    r
}

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + seed * 7) % 13) as f32 / 4.0 - 1.5)
        .collect()
}

#[test]
fn a_batched_product_with_bias_on_a_stream_matches_the_definition() {
    common::init();
    let (m, n, k, batch) = (6usize, 5usize, 4usize, 2usize);
    let s = common::non_blocking_stream();
    let (av, bv, biasv) = (
        vals(batch * k * m, 1),
        vals(batch * k * n, 2),
        vals(batch * m, 3),
    );
    let a = common::alloc_async(av.len() * 4, s);
    let b = common::alloc_async(bv.len() * 4, s);
    let bias = common::alloc_async(biasv.len() * 4, s);
    let d = common::alloc_async(batch * m * n * 4, s);
    common::upload(a, &av, s);
    common::upload(b, &bv, s);
    common::upload(bias, &biasv, s);
    unsafe {
        let g = descriptors(m as u64, n as u64, k as u64, batch as i32);
        set(
            cublasLtMatmulDescSetAttribute,
            g.desc,
            8,
            &bias.to_le_bytes(),
        );
        set(
            cublasLtMatmulDescSetAttribute,
            g.desc,
            10,
            &(m as i64).to_le_bytes(),
        );
        let r = algorithm(&g, [a, b, d]);
        assert!(r.workspace_size <= 32 << 20);
        let ws = common::alloc_async(r.workspace_size.max(1), s);
        let (alpha, beta) = (2f32, 0f32);
        let st = cublasLtMatmul(
            g.handle,
            g.desc,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            g.a,
            b as *const c_void,
            g.b,
            &beta as *const f32 as *const c_void,
            d as *const c_void,
            g.d,
            d as *mut c_void,
            g.d,
            &r.algo,
            ws as *mut c_void,
            r.workspace_size,
            s,
        );
        assert_eq!(st, SUCCESS);
        let got = common::download(d, batch * m * n, s);
        for bt in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    // op(A) = A^T: element (i, l) is A's (l, i), at l + i * k.
                    let dot: f32 = (0..k)
                        .map(|l| av[bt * k * m + l + i * k] * bv[bt * k * n + l + j * k])
                        .sum();
                    let want = alpha * dot + biasv[bt * m + i];
                    let g = got[bt * m * n + i + j * m];
                    assert!(
                        (g - want).abs() < 1e-5,
                        "D[{bt}]({i},{j}) = {g}, want {want}"
                    );
                }
            }
        }
        // The same operands with A 4 bytes off the 256-byte boundary the algorithm assumed.
        let st = cublasLtMatmul(
            g.handle,
            g.desc,
            &alpha as *const f32 as *const c_void,
            (a + 4) as *const c_void,
            g.a,
            b as *const c_void,
            g.b,
            &beta as *const f32 as *const c_void,
            d as *const c_void,
            g.d,
            d as *mut c_void,
            g.d,
            &r.algo,
            ws as *mut c_void,
            r.workspace_size,
            s,
        );
        assert_eq!(st, NOT_SUPPORTED);
    }
    assert_eq!(cuCtxSynchronize(), mockcuda::driver::SUCCESS);
}
