//! The product cuBLASLt computes, on host bytes: `D = alpha op(A) op(B) + beta C (+ bias)`,
//! batch by batch, with fp32 accumulation, from the definitions of cuBLASLt's documentation
//! (matrix layouts, transposes, strided batches, the bias epilogue).

use crate::libcommon::{round_tf32, Elem};

/// One matrix as a layout describes it: rows x cols elements, column-major (element `(i, j)`
/// at `j * ld + i`) unless `row_major` (`i * ld + j`), and `batch` matrices `stride` elements
/// apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matrix {
    pub elem: Elem,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub row_major: bool,
    pub batch: i32,
    pub stride: i64,
}

impl Matrix {
    /// The element index of `(i, j)` of matrix `b` of the batch.
    pub fn index(&self, b: usize, i: usize, j: usize) -> usize {
        let ld = self.ld as usize;
        let within = if self.row_major {
            i * ld + j
        } else {
            j * ld + i
        };
        b * self.stride as usize + within
    }

    /// The bytes from the base address to the end of the last element of the last matrix
    /// (every element lies inside).
    pub fn span_bytes(&self) -> usize {
        if self.rows == 0 || self.cols == 0 || self.batch <= 0 {
            return 0;
        }
        let last = (0..self.batch as usize)
            .map(|b| self.index(b, self.rows as usize - 1, self.cols as usize - 1))
            .max()
            .unwrap_or(0);
        (last + 1) * self.elem.size()
    }
}

/// The bias epilogue: `bias[i]` (plus `batch_stride` per matrix of the batch) added to every
/// element of row `i` of D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bias {
    pub elem: Elem,
    pub batch_stride: i64,
}

/// One product: `op(A)` is m x k, `op(B)` k x n, C and D m x n.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Product {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<Bias>,
    /// Operands rounded to TF32 before the products (a TF32 compute type).
    pub tf32: bool,
}

/// D's values (matrix by matrix, column-major m x n, dense) for `p`. `c` is read only when
/// `beta != 0` (the documentation lets C be anything then).
pub fn product(
    p: &Product,
    a: (&Matrix, &[u8]),
    b: (&Matrix, &[u8]),
    c: (&Matrix, &[u8]),
    bias_bytes: &[u8],
) -> Vec<f32> {
    let (m, n, k) = (p.m, p.n, p.k);
    let round = |v: f32| if p.tf32 { round_tf32(v) } else { v };
    let mut d = vec![0f32; p.batch * m * n];
    // op(A) row by row and op(B) column by column, each row/column contiguous over k.
    let mut arows = vec![0f32; m * k];
    let mut bcols = vec![0f32; n * k];
    for batch in 0..p.batch {
        let (am, ab) = a;
        for i in 0..m {
            for l in 0..k {
                let idx = if p.trans_a {
                    am.index(batch, l, i)
                } else {
                    am.index(batch, i, l)
                };
                arows[i * k + l] = round(am.elem.load(ab, idx));
            }
        }
        let (bm, bb) = b;
        for j in 0..n {
            for l in 0..k {
                let idx = if p.trans_b {
                    bm.index(batch, j, l)
                } else {
                    bm.index(batch, l, j)
                };
                bcols[j * k + l] = round(bm.elem.load(bb, idx));
            }
        }
        let out = &mut d[batch * m * n..(batch + 1) * m * n];
        for j in 0..n {
            let col = &bcols[j * k..(j + 1) * k];
            for i in 0..m {
                let row = &arows[i * k..(i + 1) * k];
                let acc: f32 = row.iter().zip(col).map(|(x, y)| x * y).sum();
                let mut v = p.alpha * acc;
                if p.beta != 0.0 {
                    let (cm, cb) = c;
                    v += p.beta * cm.elem.load(cb, cm.index(batch, i, j));
                }
                if let Some(bias) = p.bias {
                    let at = batch * bias.batch_stride as usize + i;
                    v += bias.elem.load(bias_bytes, at);
                }
                out[j * m + i] = v;
            }
        }
    }
    d
}

/// The bytes the bias vectors of `p` span.
pub fn bias_span_bytes(p: &Product) -> usize {
    match p.bias {
        Some(b) if p.m > 0 && p.batch > 0 => {
            ((p.batch - 1) * b.batch_stride as usize + p.m) * b.elem.size()
        }
        _ => 0,
    }
}

/// Stores D's values (as [`product`] returns them) into D's layout, rounded to its type.
pub fn store(d: &Matrix, values: &[f32], bytes: &mut [u8]) {
    let (m, n) = (d.rows as usize, d.cols as usize);
    for batch in 0..d.batch.max(0) as usize {
        for j in 0..n {
            for i in 0..m {
                d.elem.store(
                    bytes,
                    d.index(batch, i, j),
                    values[batch * m * n + j * m + i],
                );
            }
        }
    }
}
