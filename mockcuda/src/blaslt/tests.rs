//! cuBLASLt against plain loops written from its documentation, and the documented statuses of
//! the descriptors, the heuristic and the call's checks.

use std::ffi::c_void;
use std::ptr::null_mut;

use super::compute::{self, Bias, Matrix, Product};
use super::desc::*;
use super::*;
use crate::libcommon::Elem;

/// Deterministic values with few mantissa bits (exact in bf16), some negative.
fn value(i: usize, seed: usize) -> f32 {
    (((i * 2_654_435_761 + seed * 97) >> 7) % 23) as f32 / 8.0 - 1.25
}

fn fill(m: &Matrix, seed: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; m.span_bytes()];
    for i in 0..bytes.len() / m.elem.size() {
        m.elem.store(&mut bytes, i, value(i, seed));
    }
    bytes
}

/// Element `(r, c)` of matrix `b` of a batch, read from the documentation's layout rule.
fn element(bytes: &[u8], m: &Matrix, b: usize, r: usize, c: usize) -> f64 {
    let off = b as i64 * m.stride
        + if m.row_major {
            r as i64 * m.ld + c as i64
        } else {
            c as i64 * m.ld + r as i64
        };
    m.elem.load(bytes, off as usize) as f64
}

/// D = alpha op(A) op(B) + beta C + bias, in f64, straight from the definition.
#[allow(clippy::too_many_arguments)]
fn reference(
    p: &Product,
    a: &Matrix,
    ab: &[u8],
    b: &Matrix,
    bb: &[u8],
    c: &Matrix,
    cb: &[u8],
    bias: &[u8],
) -> Vec<f64> {
    let mut out = vec![];
    for batch in 0..p.batch {
        for j in 0..p.n {
            for i in 0..p.m {
                let mut s = 0f64;
                for l in 0..p.k {
                    let x = if p.trans_a {
                        element(ab, a, batch, l, i)
                    } else {
                        element(ab, a, batch, i, l)
                    };
                    let y = if p.trans_b {
                        element(bb, b, batch, j, l)
                    } else {
                        element(bb, b, batch, l, j)
                    };
                    s += x * y;
                }
                let mut v = p.alpha as f64 * s;
                if p.beta != 0.0 {
                    v += p.beta as f64 * element(cb, c, batch, i, j);
                }
                if let Some(bi) = p.bias {
                    v += bi.elem.load(bias, batch * bi.batch_stride as usize + i) as f64;
                }
                out.push(v);
            }
        }
    }
    out
}

fn matrix(elem: Elem, rows: u64, cols: u64, row_major: bool, pad: i64, batch: i32) -> Matrix {
    let ld = if row_major { cols } else { rows } as i64 + pad;
    let one = if row_major {
        rows as i64 * ld
    } else {
        cols as i64 * ld
    };
    Matrix {
        elem,
        rows,
        cols,
        ld,
        row_major,
        batch,
        stride: one + 3 * pad,
    }
}

#[test]
fn products_follow_the_definition_for_every_layout_transpose_and_type() {
    let (m, n, k) = (5usize, 3usize, 7usize);
    let mut cases = 0;
    for (ab_elem, d_elem) in [
        (Elem::F32, Elem::F32),
        (Elem::Bf16, Elem::Bf16),
        (Elem::Bf16, Elem::F32),
    ] {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for row_major in [false, true] {
                    for (pad, batch) in [(0, 1), (2, 3)] {
                        for (alpha, beta, with_bias) in [(1.0, 0.0, false), (0.5, -1.5, true)] {
                            let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
                            let (br, bc) = if trans_b { (n, k) } else { (k, n) };
                            let a = matrix(ab_elem, ar as u64, ac as u64, row_major, pad, batch);
                            let b = matrix(ab_elem, br as u64, bc as u64, !row_major, pad, batch);
                            let c = matrix(d_elem, m as u64, n as u64, row_major, pad + 1, batch);
                            let d = matrix(d_elem, m as u64, n as u64, row_major, pad, batch);
                            let p = Product {
                                trans_a,
                                trans_b,
                                m,
                                n,
                                k,
                                batch: batch as usize,
                                alpha,
                                beta,
                                bias: with_bias.then_some(Bias {
                                    elem: d_elem,
                                    batch_stride: if batch > 1 { m as i64 } else { 0 },
                                }),
                                tf32: false,
                            };
                            let (ab, bb, cb) = (fill(&a, 1), fill(&b, 2), fill(&c, 3));
                            let bias = {
                                let mut v = vec![0u8; compute::bias_span_bytes(&p)];
                                for i in 0..v.len() / d_elem.size() {
                                    d_elem.store(&mut v, i, value(i, 4));
                                }
                                v
                            };
                            let want = reference(&p, &a, &ab, &b, &bb, &c, &cb, &bias);
                            let got = compute::product(&p, (&a, &ab), (&b, &bb), (&c, &cb), &bias);
                            let mut db = vec![0u8; d.span_bytes()];
                            compute::store(&d, &got, &mut db);
                            let tol = if d_elem == Elem::Bf16 {
                                1.0 / 64.0
                            } else {
                                1e-5
                            };
                            for batch in 0..p.batch {
                                for j in 0..n {
                                    for i in 0..m {
                                        let w = want[batch * m * n + j * m + i];
                                        let g = element(&db, &d, batch, i, j);
                                        assert!(
                                            (g - w).abs() <= tol * (1.0 + w.abs()),
                                            "{p:?} {a:?} D({batch},{i},{j}) = {g}, want {w}"
                                        );
                                    }
                                }
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 3 * 2 * 2 * 2 * 2 * 2);
}

#[test]
fn in_place_reads_c_before_writing_d() {
    let d = matrix(Elem::F32, 2, 2, false, 0, 1);
    let a = matrix(Elem::F32, 2, 1, false, 0, 1);
    let b = matrix(Elem::F32, 1, 2, false, 0, 1);
    let mut buf = vec![0u8; 16];
    for (i, v) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
        Elem::F32.store(&mut buf, i, *v);
    }
    let ab = fill(&a, 5);
    let bb = fill(&b, 6);
    let p = Product {
        trans_a: false,
        trans_b: false,
        m: 2,
        n: 2,
        k: 1,
        batch: 1,
        alpha: 1.0,
        beta: 1.0,
        bias: None,
        tf32: false,
    };
    let got = compute::product(&p, (&a, &ab), (&b, &bb), (&d, &buf), &[]);
    compute::store(&d, &got, &mut buf);
    for j in 0..2 {
        for i in 0..2 {
            let want = (1 + i + 2 * j) as f32 + Elem::F32.load(&ab, i) * Elem::F32.load(&bb, j);
            assert_eq!(Elem::F32.load(&buf, i + 2 * j), want);
        }
    }
}

#[test]
fn tf32_compute_rounds_the_operands() {
    let a = matrix(Elem::F32, 1, 1, false, 0, 1);
    let mut ab = vec![0u8; 4];
    Elem::F32.store(&mut ab, 0, 1.0 + 2f32.powi(-12));
    let mut p = Product {
        trans_a: false,
        trans_b: false,
        m: 1,
        n: 1,
        k: 1,
        batch: 1,
        alpha: 1.0,
        beta: 0.0,
        bias: None,
        tf32: false,
    };
    let exact = compute::product(&p, (&a, &ab), (&a, &ab), (&a, &[]), &[]);
    p.tf32 = true;
    let tf32 = compute::product(&p, (&a, &ab), (&a, &ab), (&a, &[]), &[]);
    assert_eq!(tf32[0], 1.0);
    assert!(exact[0] > 1.0);
}

// The entry points' checks (no device memory needed: they refuse before touching it).

unsafe fn make_layout(elem: u32, rows: u64, cols: u64, ld: i64) -> *mut c_void {
    let mut l = null_mut();
    assert_eq!(
        cublasLtMatrixLayoutCreate(&mut l, elem, rows, cols, ld),
        SUCCESS
    );
    l
}

unsafe fn set_desc(desc: *mut c_void, attr: u32, v: &[u8]) -> Status {
    cublasLtMatmulDescSetAttribute(desc, attr, v.as_ptr() as *const c_void, v.len())
}

struct Setup {
    handle: *mut c_void,
    desc: *mut c_void,
    a: *mut c_void,
    b: *mut c_void,
    d: *mut c_void,
    pref: *mut c_void,
}

/// D (4x3) = A (4x2) B (2x3), fp32, column-major; a 1 MiB workspace allowed.
unsafe fn setup() -> Setup {
    let mut s = Setup {
        handle: null_mut(),
        desc: null_mut(),
        a: make_layout(0, 4, 2, 4),
        b: make_layout(0, 2, 3, 2),
        d: make_layout(0, 4, 3, 4),
        pref: null_mut(),
    };
    assert_eq!(cublasLtCreate(&mut s.handle), SUCCESS);
    assert_eq!(cublasLtMatmulDescCreate(&mut s.desc, 68, 0), SUCCESS);
    assert_eq!(cublasLtMatmulPreferenceCreate(&mut s.pref), SUCCESS);
    let ws = (1u64 << 20).to_le_bytes();
    assert_eq!(
        cublasLtMatmulPreferenceSetAttribute(s.pref, 1, ws.as_ptr() as *const c_void, 8),
        SUCCESS
    );
    s
}

unsafe fn heuristic(s: &Setup) -> (Status, HeuristicResult, i32) {
    let mut r: HeuristicResult = std::mem::zeroed();
    let mut n = 0;
    let st = cublasLtMatmulAlgoGetHeuristic(
        s.handle, s.desc, s.a, s.b, s.d, s.d, s.pref, 1, &mut r, &mut n,
    );
    (st, r, n)
}

#[test]
fn the_heuristic_honours_the_preference() {
    unsafe {
        let s = setup();
        let (st, r, n) = heuristic(&s);
        assert_eq!((st, n, r.state), (SUCCESS, 1, SUCCESS));
        // An fp32 copy of D in 256-byte units, within the 1 MiB allowed.
        assert_eq!(r.workspace_size, 256);
        assert_eq!(r.algo.align(), [256; 4]);
        // No workspace allowed: an algorithm that needs none.
        let zero = 0u64.to_le_bytes();
        cublasLtMatmulPreferenceSetAttribute(s.pref, 1, zero.as_ptr() as *const c_void, 8);
        let four = 4u32.to_le_bytes();
        for attr in 5..=8 {
            cublasLtMatmulPreferenceSetAttribute(s.pref, attr, four.as_ptr() as *const c_void, 4);
        }
        let (st, r, _) = heuristic(&s);
        assert_eq!((st, r.workspace_size), (SUCCESS, 0));
        assert_eq!(r.algo.align(), [4; 4]);
        // requestedAlgoCount must be positive.
        let mut n = 0;
        let mut out: HeuristicResult = std::mem::zeroed();
        assert_eq!(
            cublasLtMatmulAlgoGetHeuristic(
                s.handle, s.desc, s.a, s.b, s.d, s.d, s.pref, 0, &mut out, &mut n
            ),
            INVALID_VALUE
        );
    }
}

#[test]
fn descriptors_are_checked_as_documented() {
    unsafe {
        let s = setup();
        // An attribute of the wrong size.
        assert_eq!(set_desc(s.desc, 3, &[1u8, 0]), INVALID_VALUE);
        // Transposing A makes op(A) 2x4: the shapes disagree.
        assert_eq!(set_desc(s.desc, 3, &1i32.to_le_bytes()), SUCCESS);
        assert_eq!(heuristic(&s).0, INVALID_VALUE);
        assert_eq!(set_desc(s.desc, 3, &0i32.to_le_bytes()), SUCCESS);
        assert_eq!(heuristic(&s).0, SUCCESS);
        // A leading dimension below the rows.
        let ld = 3i64.to_le_bytes();
        assert_eq!(
            cublasLtMatrixLayoutSetAttribute(s.a, 4, ld.as_ptr() as *const c_void, 8),
            SUCCESS
        );
        assert_eq!(heuristic(&s).0, INVALID_VALUE);
        let ld = 4i64.to_le_bytes();
        cublasLtMatrixLayoutSetAttribute(s.a, 4, ld.as_ptr() as *const c_void, 8);
        // fp32 A/B with a bf16 D is no cuBLASLt combination.
        let bf16 = 14u32.to_le_bytes();
        cublasLtMatrixLayoutSetAttribute(s.d, 0, bf16.as_ptr() as *const c_void, 4);
        assert_eq!(heuristic(&s).0, NOT_SUPPORTED);
        let f32t = 0u32.to_le_bytes();
        cublasLtMatrixLayoutSetAttribute(s.d, 0, f32t.as_ptr() as *const c_void, 4);
        // Row order: A read row-major is a 4x2 with ld >= 2.
        let row = 1i32.to_le_bytes();
        cublasLtMatrixLayoutSetAttribute(s.a, 1, row.as_ptr() as *const c_void, 4);
        assert_eq!(heuristic(&s).0, SUCCESS);
        // Batches must agree.
        let three = 3i32.to_le_bytes();
        cublasLtMatrixLayoutSetAttribute(s.b, 5, three.as_ptr() as *const c_void, 4);
        assert_eq!(heuristic(&s).0, INVALID_VALUE);
        // A destroyed handle, descriptor or layout is refused.
        assert_eq!(cublasLtMatrixLayoutDestroy(s.b), SUCCESS);
        assert_eq!(cublasLtMatrixLayoutDestroy(s.b), INVALID_VALUE);
        assert_eq!(heuristic(&s).0, INVALID_VALUE);
        assert_eq!(cublasLtDestroy(s.handle), SUCCESS);
        assert_eq!(cublasLtDestroy(s.handle), NOT_INITIALIZED);
        assert_eq!(heuristic(&s).0, NOT_INITIALIZED);
    }
}

#[test]
fn a_call_checks_alignment_workspace_in_place_and_bias() {
    unsafe {
        let s = setup();
        let (_, r, _) = heuristic(&s);
        let (md, mut p) = lookup(s.handle, s.desc, [s.a, s.b, s.d, s.d]).unwrap();
        let base = 0x7000_0000_0000u64;
        let ptrs = [base, base + 0x1000, base + 0x2000, base + 0x2000];
        let ws = base + 0x3000;
        assert_eq!(
            check_call(&md, &p, &r.algo, ptrs, ws, r.workspace_size),
            Ok(())
        );
        // A at a 16-byte boundary, under an algorithm chosen for 256.
        let mut moved = ptrs;
        moved[0] += 16;
        let e = check_call(&md, &p, &r.algo, moved, ws, r.workspace_size).unwrap_err();
        assert_eq!(e.0, NOT_SUPPORTED, "{}", e.1);
        assert!(e.1.contains("A at") && e.1.contains("256"), "{}", e.1);
        // C misaligned is ignored when beta is 0 (C is not read).
        let mut c_off = ptrs;
        c_off[2] += 4;
        assert_eq!(
            check_call(&md, &p, &r.algo, c_off, ws, r.workspace_size),
            Ok(())
        );
        // Too little workspace.
        let e = check_call(&md, &p, &r.algo, ptrs, ws, r.workspace_size - 1).unwrap_err();
        assert_eq!(e.0, INVALID_VALUE);
        // A made-up algorithm.
        let e = check_call(&md, &p, &Algo { data: [0; 8] }, ptrs, ws, 1 << 20).unwrap_err();
        assert_eq!(e.0, INVALID_VALUE);
        // In place with C's layout differing from D's.
        p.product.beta = 1.0;
        p.c.ld = 5;
        let e = check_call(&md, &p, &r.algo, ptrs, ws, r.workspace_size).unwrap_err();
        assert!(e.1.contains("in place"), "{}", e.1);
        // The bias epilogue without a bias pointer.
        assert_eq!(set_desc(s.desc, 7, &EPILOGUE_BIAS.to_le_bytes()), SUCCESS);
        let (md, p) = lookup(s.handle, s.desc, [s.a, s.b, s.d, s.d]).unwrap();
        assert_eq!(p.product.bias.map(|b| b.elem), Some(Elem::F32));
        let e = check_call(&md, &p, &r.algo, ptrs, ws, r.workspace_size).unwrap_err();
        assert!(e.1.contains("bias pointer"), "{}", e.1);
        assert_eq!(set_desc(s.desc, 8, &(base + 0x4000).to_le_bytes()), SUCCESS);
        let (md, p) = lookup(s.handle, s.desc, [s.a, s.b, s.d, s.d]).unwrap();
        assert_eq!(
            check_call(&md, &p, &r.algo, ptrs, ws, r.workspace_size),
            Ok(())
        );
    }
}

#[test]
fn status_names_are_nul_terminated() {
    for s in [
        SUCCESS,
        NOT_INITIALIZED,
        INVALID_VALUE,
        EXECUTION_FAILED,
        NOT_SUPPORTED,
        99,
    ] {
        let name = status_name(s);
        assert!(
            name.starts_with("CUBLAS_STATUS_") && name.ends_with('\0'),
            "{name}"
        );
    }
}
