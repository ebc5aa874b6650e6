//! cuBLASLt's descriptors (matmul descriptor, matrix layouts, preference), their attributes,
//! and the check of a whole problem against the documented rules.

use crate::error::unimplemented;
use crate::libcommon::Elem;

use super::compute::{Bias, Matrix, Product};

/// `cublasStatus_t`.
pub type Status = u32;
pub const SUCCESS: Status = 0;
pub const NOT_INITIALIZED: Status = 1;
pub const INVALID_VALUE: Status = 7;
pub const EXECUTION_FAILED: Status = 13;
pub const NOT_SUPPORTED: Status = 15;

/// A refusal: the status and what was wrong (explained on stderr by the entry point).
pub type Refusal = (Status, String);

// `cudaDataType_t`.
const R_32F: i64 = 0;
const R_16BF: i64 = 14;
// `cublasComputeType_t`.
const COMPUTE_32F: i32 = 68;
const COMPUTE_32F_PEDANTIC: i32 = 69;
const COMPUTE_32F_FAST_TF32: i32 = 77;
// `cublasLtEpilogue_t`.
pub const EPILOGUE_DEFAULT: u32 = 1;
pub const EPILOGUE_BIAS: u32 = 4;

/// The element type of a `cudaDataType_t`; the mock computes on fp32 and bf16 only.
pub fn elem_of(function: &str, t: i64) -> Elem {
    match t {
        R_32F => Elem::F32,
        R_16BF => Elem::Bf16,
        other => unimplemented(
            function,
            &format!(
                "cudaDataType {other} (only CUDA_R_32F = 0 and CUDA_R_16BF = 14 are modelled)"
            ),
        ),
    }
}

/// The state of a `cublasLtMatmulDesc_t`.
#[derive(Debug, Clone, PartialEq)]
pub struct MatmulDesc {
    pub compute: i32,
    pub scale: i64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub epilogue: u32,
    pub bias_pointer: u64,
    /// -1: the type of D (the documented default).
    pub bias_type: i64,
    pub bias_batch_stride: i64,
}

impl MatmulDesc {
    pub fn new(function: &str, compute: i32, scale: i64) -> MatmulDesc {
        check_compute(function, compute);
        MatmulDesc {
            compute,
            scale,
            trans_a: false,
            trans_b: false,
            epilogue: EPILOGUE_DEFAULT,
            bias_pointer: 0,
            bias_type: -1,
            bias_batch_stride: 0,
        }
    }
}

fn check_compute(function: &str, compute: i32) {
    if !matches!(
        compute,
        COMPUTE_32F | COMPUTE_32F_PEDANTIC | COMPUTE_32F_FAST_TF32
    ) {
        unimplemented(
            function,
            &format!("compute type {compute} (the mock models CUBLAS_COMPUTE_32F, its PEDANTIC and FAST_TF32 forms)"),
        )
    }
}

/// The state of a `cublasLtMatrixLayout_t`.
pub type Layout = Matrix;

/// A new layout: column-major, one matrix (the documented defaults).
pub fn layout(elem: Elem, rows: u64, cols: u64, ld: i64) -> Layout {
    Matrix {
        elem,
        rows,
        cols,
        ld,
        row_major: false,
        batch: 1,
        stride: 0,
    }
}

/// The state of a `cublasLtMatmulPreference_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pref {
    pub max_workspace: u64,
    /// A, B, C, D: the alignment (bytes) the caller guarantees; 256 by default.
    pub align: [u32; 4],
}

impl Default for Pref {
    fn default() -> Self {
        Pref {
            max_workspace: 0,
            align: [256; 4],
        }
    }
}

/// The attribute's value when `buf` has exactly its size (the documented rule), else a
/// refusal naming it.
fn value<const N: usize>(name: &str, buf: &[u8]) -> Result<[u8; N], Refusal> {
    buf.try_into().map_err(|_| {
        (
            INVALID_VALUE,
            format!("{name} takes {N} bytes, {} were given", buf.len()),
        )
    })
}

fn i32_of(name: &str, buf: &[u8]) -> Result<i32, Refusal> {
    Ok(i32::from_le_bytes(value::<4>(name, buf)?))
}

fn i64_of(name: &str, buf: &[u8]) -> Result<i64, Refusal> {
    Ok(i64::from_le_bytes(value::<8>(name, buf)?))
}

/// `cublasLtMatmulDescSetAttribute`.
pub fn set_desc_attribute(d: &mut MatmulDesc, attr: u32, buf: &[u8]) -> Result<(), Refusal> {
    const F: &str = "cublasLtMatmulDescSetAttribute";
    match attr {
        0 => {
            let v = i32_of("CUBLASLT_MATMUL_DESC_COMPUTE_TYPE", buf)?;
            check_compute(F, v);
            d.compute = v;
        }
        1 => d.scale = i32_of("CUBLASLT_MATMUL_DESC_SCALE_TYPE", buf)? as i64,
        2 => {
            let v = i32_of("CUBLASLT_MATMUL_DESC_POINTER_MODE", buf)?;
            if v != 0 {
                unimplemented(F, &format!("CUBLASLT_MATMUL_DESC_POINTER_MODE {v} (only host scalars, 0, are modelled)"));
            }
        }
        3 | 4 => {
            let name = if attr == 3 {
                "CUBLASLT_MATMUL_DESC_TRANSA"
            } else {
                "CUBLASLT_MATMUL_DESC_TRANSB"
            };
            // cublasOperation_t: N = 0, T = 1, C = 2 (the same as T for real types).
            let t = match i32_of(name, buf)? {
                0 => false,
                1 | 2 => true,
                other => {
                    return Err((
                        INVALID_VALUE,
                        format!("{name} {other} is not a cublasOperation_t"),
                    ))
                }
            };
            if attr == 3 {
                d.trans_a = t;
            } else {
                d.trans_b = t;
            }
        }
        7 => {
            let v = u32::from_le_bytes(value::<4>("CUBLASLT_MATMUL_DESC_EPILOGUE", buf)?);
            if v != EPILOGUE_DEFAULT && v != EPILOGUE_BIAS {
                unimplemented(F, &format!("CUBLASLT_MATMUL_DESC_EPILOGUE {v} (the mock models DEFAULT = 1 and BIAS = 4)"));
            }
            d.epilogue = v;
        }
        8 => {
            d.bias_pointer =
                u64::from_le_bytes(value::<8>("CUBLASLT_MATMUL_DESC_BIAS_POINTER", buf)?)
        }
        10 => d.bias_batch_stride = i64_of("CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE", buf)?,
        26 => {
            let v = i32_of("CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE", buf)? as i64;
            if v != -1 {
                elem_of(F, v);
            }
            d.bias_type = v;
        }
        other => unimplemented(
            F,
            &format!("matmul descriptor attribute {other} (cublasLtMatmulDescAttributes_t)"),
        ),
    }
    Ok(())
}

/// `cublasLtMatrixLayoutSetAttribute`.
pub fn set_layout_attribute(l: &mut Layout, attr: u32, buf: &[u8]) -> Result<(), Refusal> {
    const F: &str = "cublasLtMatrixLayoutSetAttribute";
    match attr {
        0 => {
            let t = u32::from_le_bytes(value::<4>("CUBLASLT_MATRIX_LAYOUT_TYPE", buf)?);
            l.elem = elem_of(F, t as i64);
        }
        1 => {
            l.row_major = match i32_of("CUBLASLT_MATRIX_LAYOUT_ORDER", buf)? {
                0 => false,
                1 => true,
                other => unimplemented(
                    F,
                    &format!(
                    "CUBLASLT_MATRIX_LAYOUT_ORDER {other} (the mock models COL = 0 and ROW = 1)"
                ),
                ),
            }
        }
        2 => l.rows = u64::from_le_bytes(value::<8>("CUBLASLT_MATRIX_LAYOUT_ROWS", buf)?),
        3 => l.cols = u64::from_le_bytes(value::<8>("CUBLASLT_MATRIX_LAYOUT_COLS", buf)?),
        4 => l.ld = i64_of("CUBLASLT_MATRIX_LAYOUT_LD", buf)?,
        5 => l.batch = i32_of("CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT", buf)?,
        6 => l.stride = i64_of("CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET", buf)?,
        other => unimplemented(
            F,
            &format!("matrix layout attribute {other} (cublasLtMatrixLayoutAttribute_t)"),
        ),
    }
    Ok(())
}

/// `cublasLtMatmulPreferenceSetAttribute`.
pub fn set_pref_attribute(p: &mut Pref, attr: u32, buf: &[u8]) -> Result<(), Refusal> {
    const F: &str = "cublasLtMatmulPreferenceSetAttribute";
    match attr {
        0 => {
            let v = u32::from_le_bytes(value::<4>("CUBLASLT_MATMUL_PREF_SEARCH_MODE", buf)?);
            if v != 0 {
                unimplemented(
                    F,
                    &format!("CUBLASLT_MATMUL_PREF_SEARCH_MODE {v} (only BEST_FIT, 0)"),
                );
            }
        }
        1 => {
            p.max_workspace =
                u64::from_le_bytes(value::<8>("CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES", buf)?)
        }
        5..=8 => {
            let v = u32::from_le_bytes(value::<4>(
                "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES",
                buf,
            )?);
            p.align[(attr - 5) as usize] = v;
        }
        other => unimplemented(
            F,
            &format!("preference attribute {other} (cublasLtMatmulPreferenceAttributes_t)"),
        ),
    }
    Ok(())
}

/// A problem every descriptor of which agrees, ready to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    pub a: Matrix,
    pub b: Matrix,
    pub c: Matrix,
    pub d: Matrix,
    pub product: Product,
}

fn bad(status: Status, msg: String) -> Result<Problem, Refusal> {
    Err((status, msg))
}

/// Checks the descriptors against each other (types, shapes, leading dimensions, batches)
/// as the documentation states them; `alpha`/`beta` are filled in by the caller.
pub fn problem(
    desc: &MatmulDesc,
    a: &Layout,
    b: &Layout,
    c: &Layout,
    d: &Layout,
) -> Result<Problem, Refusal> {
    if desc.scale != R_32F {
        return bad(
            NOT_SUPPORTED,
            format!(
                "scale type {} with a 32F compute type (only CUDA_R_32F)",
                desc.scale
            ),
        );
    }
    if a.elem != b.elem {
        return bad(
            NOT_SUPPORTED,
            format!(
                "A is {:?} and B {:?}: they must have one type",
                a.elem, b.elem
            ),
        );
    }
    if c.elem != d.elem {
        return bad(
            NOT_SUPPORTED,
            format!(
                "C is {:?} and D {:?}: they must have one type",
                c.elem, d.elem
            ),
        );
    }
    if a.elem == Elem::F32 && d.elem == Elem::Bf16 {
        return bad(
            NOT_SUPPORTED,
            "fp32 A/B with a bf16 D is not a cuBLASLt type combination".into(),
        );
    }
    for (name, l) in [("A", a), ("B", b), ("C", c), ("D", d)] {
        let min_ld = if l.row_major { l.cols } else { l.rows }.max(1);
        if l.ld < 0 || (l.ld as u64) < min_ld {
            return bad(
                INVALID_VALUE,
                format!("{name}'s leading dimension {} is below {min_ld}", l.ld),
            );
        }
        if l.batch < 1 || l.stride < 0 {
            return bad(
                INVALID_VALUE,
                format!("{name}'s batch count {} / stride {}", l.batch, l.stride),
            );
        }
    }
    let (m, k) = if desc.trans_a {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (kb, n) = if desc.trans_b {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if k != kb || d.rows != m || d.cols != n {
        return bad(
            INVALID_VALUE,
            format!(
                "op(A) is {m}x{k}, op(B) {kb}x{n} and D {}x{}: the shapes disagree",
                d.rows, d.cols
            ),
        );
    }
    if (c.rows, c.cols, c.batch, c.row_major) != (d.rows, d.cols, d.batch, d.row_major) {
        return bad(
            INVALID_VALUE,
            "C and D differ in rows, columns, batch count or order".into(),
        );
    }
    if a.batch != d.batch || b.batch != d.batch {
        return bad(
            INVALID_VALUE,
            format!(
                "batch counts A {}, B {}, D {} differ",
                a.batch, b.batch, d.batch
            ),
        );
    }
    let bias = match desc.epilogue {
        EPILOGUE_BIAS => Some(Bias {
            elem: if desc.bias_type == -1 {
                d.elem
            } else {
                elem_of("cublasLtMatmul", desc.bias_type)
            },
            batch_stride: desc.bias_batch_stride,
        }),
        _ => None,
    };
    if desc.bias_batch_stride < 0 {
        return bad(
            INVALID_VALUE,
            format!("bias batch stride {}", desc.bias_batch_stride),
        );
    }
    Ok(Problem {
        a: *a,
        b: *b,
        c: *c,
        d: *d,
        product: Product {
            trans_a: desc.trans_a,
            trans_b: desc.trans_b,
            m: m as usize,
            n: n as usize,
            k: k as usize,
            batch: d.batch as usize,
            alpha: 1.0,
            beta: 0.0,
            bias,
            tf32: desc.compute == COMPUTE_32F_FAST_TF32,
        },
    })
}

/// The workspace the mock's algorithm wants: room for an fp32 copy of D (what a split-K
/// reduction keeps), in 256-byte units, at most 4 MiB; none when the preference allows less.
pub fn workspace_wanted(p: &Problem, pref: &Pref) -> usize {
    let want = (p.product.m * p.product.n * p.product.batch * 4).div_ceil(256) * 256;
    let want = want.min(4 << 20);
    if want as u64 <= pref.max_workspace {
        want
    } else {
        0
    }
}

/// The alignments (bytes) an algorithm chosen under `pref` requires of A, B, C, D: what the
/// caller guaranteed, and never less than one element.
pub fn alignments(p: &Problem, pref: &Pref) -> [u32; 4] {
    let sizes = [p.a.elem, p.b.elem, p.c.elem, p.d.elem].map(|e| e.size() as u32);
    std::array::from_fn(|i| pref.align[i].max(sizes[i]))
}
