//! Matrix products through cuBLASLt.
//!
//! The engine's tensors are row-major and cuBLASLt is column-major. A row-major `[r, c]`
//! buffer read column-major is its transpose `[c, r]`, so the row-major product
//! `D = op(A) op(B)` (`[m, k] x [k, n]`) is computed as the column-major
//! `D^T = op(B)^T op(A)^T` (`[n, k] x [k, m]`): cuBLASLt's "A" is the engine's `b`, its "B" the
//! engine's `a`, each with its own transpose flag, and no operand is ever copied or transposed
//! in memory ([`Gemm::lt`]; the tests check the mapping against the CPU matmul with a
//! column-major reference of what cuBLASLt computes).
//!
//! Types: f32 or bf16 operands, always with fp32 accumulation (`CUBLAS_COMPUTE_32F`, f32
//! scales); the output is the operands' type, or f32 for bf16 operands (parameter gradients
//! of f32 weights). The bias epilogue (`CUBLASLT_EPILOGUE_BIAS`) adds a vector along the
//! engine's last axis: the rows of the column-major `D^T`, which is the vector cuBLASLt's
//! epilogue broadcasts. cuBLASLt's GELU epilogues are the tanh approximation while the
//! engine's GELU (BERT's) is the exact erf form, so no GELU epilogue is used: the result would
//! not match the CPU twin.
//!
//! Plans: the descriptors and the heuristic's algorithm are made once per problem ([`Gemm`]:
//! shape, transposes, types, epilogue) and operand alignment
//! ([`super::operand_alignment`]) and kept in the context; the workspace (at most [`MAX_WORKSPACE`]) is one buffer per stream role, grown
//! when a plan needs more. A product runs on the calling thread's current stream (the
//! student's, or the teacher's inside a `cuda::on_stream` scope) and uses that stream's
//! workspace: products queued on one stream run one after another, so they can share a
//! workspace, while a teacher's product and a student's may run at the same time and must not.
//! The handle and the plans are shared (a cuBLASLt handle is not tied to a stream: the stream
//! is an argument of each call).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};

use super::libs::{self, Library};
use super::operand_alignment as alignment;
use super::{CudaContext, DeviceBuffer, StreamRole};
use crate::{DType, Error, Result};

/// The workspace cuBLASLt may use (NVIDIA recommends 32 MiB on Hopper).
pub(crate) const MAX_WORKSPACE: usize = 32 << 20;

/// A row-major product `D[b] = op(A[b]) op(B[b]) (+ bias)` over `batch` matrices stored one
/// after another: `op(A)` is `[m, k]`, `op(B)` is `[k, n]`, `D` is `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// The type of both operands.
    pub input: DType,
    /// The type of `D` (and of the bias).
    pub output: DType,
    /// Adds `bias[j]` to every `D[.., i, j]`.
    pub bias: bool,
}

/// One matrix as cuBLASLt sees it: column-major `rows x cols`, leading dimension, and the
/// distance between consecutive matrices of a batch (elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub stride: i64,
}

/// The column-major problem cuBLASLt solves for a [`Gemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LtProblem {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: Layout,
    pub b: Layout,
    pub d: Layout,
    pub batch: i32,
}

impl Gemm {
    /// Errors for a type combination cuBLASLt does not offer with fp32 compute, or sizes
    /// beyond its 64-bit dimensions and 32-bit batch count.
    pub(crate) fn check(&self) -> Result<()> {
        let ok = matches!(
            (self.input, self.output),
            (DType::F32, DType::F32) | (DType::BF16, DType::BF16) | (DType::BF16, DType::F32)
        );
        if !ok {
            return Err(Error::invalid(
                "matmul (cuBLASLt)",
                format!(
                    "{} operands with a {} result are not a cuBLASLt combination",
                    self.input, self.output
                ),
            ));
        }
        let too_big = |v: usize| i64::try_from(v).is_err();
        if [self.m, self.k, self.n].iter().any(|&v| too_big(v))
            || i32::try_from(self.batch).is_err()
            || self
                .m
                .checked_mul(self.k)
                .and_then(|_| self.k.checked_mul(self.n))
                .and_then(|_| self.m.checked_mul(self.n))
                .is_none_or(too_big)
        {
            return Err(Error::invalid(
                "matmul (cuBLASLt)",
                format!("{self:?} is beyond cuBLASLt's dimensions"),
            ));
        }
        Ok(())
    }

    /// The column-major problem: cuBLASLt's A is the engine's `b`, its B the engine's `a`
    /// (see the module doc).
    pub(crate) fn lt(&self) -> LtProblem {
        let (m, k, n) = (self.m as u64, self.k as u64, self.n as u64);
        // Row-major storage [r, c] of each operand.
        let (rb, cb) = if self.trans_b { (n, k) } else { (k, n) };
        let (ra, ca) = if self.trans_a { (k, m) } else { (m, k) };
        LtProblem {
            trans_a: self.trans_b,
            trans_b: self.trans_a,
            a: Layout {
                rows: cb,
                cols: rb,
                ld: cb as i64,
                stride: (k * n) as i64,
            },
            b: Layout {
                rows: ca,
                cols: ra,
                ld: ca as i64,
                stride: (m * k) as i64,
            },
            d: Layout {
                rows: n,
                cols: m,
                ld: n as i64,
                stride: (m * n) as i64,
            },
            batch: self.batch as i32,
        }
    }
}

/// A plan's key: the problem and the alignments of cuBLASLt's A, B and C/D (the engine's `b`,
/// `a` and `d`).
type PlanKey = (Gemm, [u32; 3]);

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

/// A descriptor handle of cuBLASLt (a raw pointer the library owns).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by `Plan::new`, destroyed once, here. Errors are ignored: a failed
        // destroy leaks a few bytes of host memory.
        unsafe {
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn lt_err(ordinal: usize, what: &str) -> impl Fn(lt::CublasError) -> Error + '_ {
    move |e| Error::Device(format!("cuda:{ordinal}: cuBLASLt {what}: {e}"))
}

impl Plan {
    fn new(ordinal: usize, handle: sys::cublasLtHandle_t, key: &PlanKey) -> Result<Plan> {
        let (g, align) = key;
        let p = g.lt();
        let err = |w| lt_err(ordinal, w);
        let layout = |l: &Layout, t: DType| -> Result<sys::cublasLtMatrixLayout_t> {
            let h = lt::create_matrix_layout(data_type(t), l.rows, l.cols, l.ld)
                .map_err(err("creating a matrix layout"))?;
            if p.batch > 1 {
                // SAFETY: `h` was just made; the attributes take an i32 and an i64.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        h,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &p.batch as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(err("setting the batch count"))?;
                    lt::set_matrix_layout_attribute(
                        h,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &l.stride as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(err("setting the batch stride"))?;
                }
            }
            Ok(h)
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err("creating a matmul descriptor"))?;
        // Owned from here: a failure below destroys what was made.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            workspace: 0,
        };
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, v: i32| {
            // SAFETY: `desc` is alive; these attributes take a 32-bit value.
            unsafe {
                lt::set_matmul_desc_attribute(desc, attr, &v as *const i32 as *const c_void, 4)
            }
            .map_err(err("setting a matmul attribute"))
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // cublasOperation_t: 0 = N, 1 = T.
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, p.trans_a as i32)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, p.trans_b as i32)?;
        if g.bias {
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32,
            )?;
        }
        plan.a = layout(&p.a, g.input)?;
        plan.b = layout(&p.b, g.input)?;
        plan.d = layout(&p.d, g.output)?;
        let pref = lt::create_matmul_pref().map_err(err("creating a preference"))?;
        let max_ws = MAX_WORKSPACE as u64;
        // SAFETY: every descriptor is alive; the preference is destroyed below.
        let found = unsafe {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let set_align = |attr, v: &u32| {
                lt::set_matmul_pref_attribute(pref, attr, v as *const u32 as *const c_void, 4)
            };
            let r = lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &max_ws as *const u64 as *const c_void,
                8,
            )
            .and_then(|()| set_align(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0]))
            .and_then(|()| set_align(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1]))
            .and_then(|()| set_align(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2]))
            .and_then(|()| set_align(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2]))
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(handle, desc, plan.a, plan.b, plan.d, plan.d, pref)
            });
            let _ = lt::destroy_matmul_pref(pref);
            r
        }
        .map_err(|e| {
            Error::Device(format!(
                "cuda:{ordinal}: cuBLASLt has no algorithm for {g:?}: {e}"
            ))
        })?;
        plan.algo = found.algo;
        plan.workspace = found.workspaceSize;
        Ok(plan)
    }
}

/// The cuBLASLt state of a context: the handle, the plans made so far, a workspace per stream
/// role.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    plans: HashMap<PlanKey, Plan>,
    // Hold an `Arc` of their own context (a cycle): contexts live for the process anyway.
    // Indexed by `StreamRole::index`; each allocated, grown and freed on its own stream.
    workspaces: [Option<DeviceBuffer>; StreamRole::COUNT],
}

// SAFETY: the handle and descriptors are library objects usable from any thread; the context
// keeps `Blas` behind a mutex, so one thread at a time uses them.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: made by `lt::create_handle`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Blas {
    fn new(ordinal: usize) -> Result<Blas> {
        libs::require(Library::CublasLt, ordinal)?;
        libs::guarded(Library::CublasLt, ordinal, || {
            let handle = lt::create_handle().map_err(lt_err(ordinal, "cublasLtCreate"))?;
            Ok(Blas {
                handle,
                plans: HashMap::new(),
                workspaces: Default::default(),
            })
        })
    }
}

/// `D = op(A) op(B) (+ bias)` on `ctx`'s current stream, for device addresses of the engine's
/// row-major operands (`bias` is ignored unless `g.bias`). Nothing is launched when `D` is
/// empty; `k == 0` must be handled by the caller (cuBLASLt rejects it).
pub(crate) fn gemm(
    ctx: &Arc<CudaContext>,
    g: &Gemm,
    a: u64,
    b: u64,
    bias: u64,
    d: u64,
) -> Result<()> {
    g.check()?;
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let ordinal = ctx.ordinal();
    let mut guard = ctx.blas.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Blas::new(ordinal)?);
    }
    let blas = guard.as_mut().expect("made above");
    ctx.bind()?;
    let handle = blas.handle;
    let key = (*g, [alignment(b), alignment(a), alignment(d)]);
    let plan = match blas.plans.entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(libs::guarded(Library::CublasLt, ordinal, || {
            Plan::new(ordinal, handle, &key)
        })?),
    };
    let role = ctx.current_role().index();
    let ws = DeviceBuffer::workspace(ctx, &mut blas.workspaces[role], plan.workspace)?;
    if g.bias {
        // SAFETY: the descriptor is alive; the attribute takes a device pointer.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const c_void,
                8,
            )
        }
        .map_err(lt_err(ordinal, "setting the bias pointer"))?;
    }
    let (alpha, beta) = (1f32, 0f32);
    // cudarc resolves a symbol on its first call (and panics when it is missing): guarded.
    // SAFETY: the descriptors match the buffers (made from the same `Gemm`, whose sizes the
    // callers derive from the tensors' shapes); every pointer is a live device allocation whose
    // free is ordered after this call on the same stream; C is D with beta = 0.
    libs::guarded(Library::CublasLt, ordinal, || unsafe {
        lt::matmul(
            handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            b as *const c_void,
            plan.a,
            a as *const c_void,
            plan.b,
            d as *const c_void,
            plan.d,
            d as *mut c_void,
            plan.d,
            &plan.algo,
            ws as *mut c_void,
            plan.workspace,
            ctx.compute_stream() as sys::cudaStream_t,
        )
        .map_err(|e| Error::Device(format!("cuda:{ordinal}: cublasLtMatmul {g:?}: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::matmul::{batched_matmul_forward_cpu, matmul_forward_cpu};

    /// What cuBLASLt computes for `p`, column-major, from its documentation:
    /// `D = op(A) op(B) + bias` (bias along D's rows), batch by batch.
    fn lt_reference(p: &LtProblem, a: &[f32], b: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (m, n) = (p.d.rows as usize, p.d.cols as usize);
        let k = if p.trans_a { p.a.rows } else { p.a.cols } as usize;
        let at = |batch: usize, i: usize, l: usize| {
            let base = batch * p.a.stride as usize;
            if p.trans_a {
                a[base + l + i * p.a.ld as usize]
            } else {
                a[base + i + l * p.a.ld as usize]
            }
        };
        let bt = |batch: usize, l: usize, j: usize| {
            let base = batch * p.b.stride as usize;
            if p.trans_b {
                b[base + j + l * p.b.ld as usize]
            } else {
                b[base + l + j * p.b.ld as usize]
            }
        };
        let mut d = vec![0f32; p.batch as usize * p.d.stride as usize];
        for batch in 0..p.batch as usize {
            for j in 0..n {
                for i in 0..m {
                    let s: f64 = (0..k)
                        .map(|l| at(batch, i, l) as f64 * bt(batch, l, j) as f64)
                        .sum();
                    let s = s as f32 + bias.map_or(0.0, |v| v[i]);
                    d[batch * p.d.stride as usize + i + j * p.d.ld as usize] = s;
                }
            }
        }
        d
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 17) as f32 / 4.0 - 2.0)
            .collect()
    }

    /// The column-major problem cuBLASLt is given computes the engine's row-major product,
    /// for every combination of transposes, batches and the bias epilogue.
    #[test]
    fn row_major_products_map_onto_cublaslt_without_copies() {
        let (m, k, n) = (3, 5, 4);
        for batch in [1usize, 3] {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    for with_bias in [false, true] {
                        let g = Gemm {
                            batch,
                            m,
                            k,
                            n,
                            trans_a,
                            trans_b,
                            input: DType::F32,
                            output: DType::F32,
                            bias: with_bias,
                        };
                        g.check().unwrap();
                        let p = g.lt();
                        assert_eq!(p.batch as usize, batch);
                        let a = values(batch * m * k, 1);
                        let b = values(batch * k * n, 2);
                        let bias = values(n, 3);
                        let mut want = vec![0f32; batch * m * n];
                        if batch == 1 {
                            matmul_forward_cpu(&a, &b, m, k, n, trans_a, trans_b, &mut want)
                                .unwrap();
                        } else {
                            batched_matmul_forward_cpu(
                                &a, &b, batch, m, k, n, trans_a, trans_b, &mut want,
                            )
                            .unwrap();
                        }
                        if with_bias {
                            for (i, v) in want.iter_mut().enumerate() {
                                *v += bias[i % n];
                            }
                        }
                        // cuBLASLt's A is the engine's b, its B the engine's a.
                        let got = lt_reference(&p, &b, &a, with_bias.then_some(bias.as_slice()));
                        assert_eq!(got, want, "{g:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn type_combinations_and_limits() {
        let g = |input, output| Gemm {
            batch: 1,
            m: 2,
            k: 2,
            n: 2,
            trans_a: false,
            trans_b: false,
            input,
            output,
            bias: false,
        };
        assert!(g(DType::F32, DType::F32).check().is_ok());
        assert!(g(DType::BF16, DType::BF16).check().is_ok());
        assert!(g(DType::BF16, DType::F32).check().is_ok());
        assert!(g(DType::F32, DType::BF16).check().is_err());
        assert!(g(DType::I32, DType::I32).check().is_err());
        let huge = Gemm {
            batch: 1 << 40,
            ..g(DType::F32, DType::F32)
        };
        assert!(huge.check().is_err());
    }
}
