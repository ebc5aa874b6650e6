//! Convolutions through cuDNN (legacy convolution API of cuDNN 9).
//!
//! NCHW tensors and `[O, C, kh, kw]` filters, f32 or bf16 storage, always fp32 compute
//! (`CUDNN_DATA_FLOAT` in the convolution descriptor). f32 convolutions ask for
//! `CUDNN_FMA_MATH`: no TF32 tensor cores (which round the operands to 10 mantissa bits, far
//! from the CPU twin); bf16 ones for `CUDNN_TENSOR_OP_MATH`.
//!
//! Plans: per problem ([`ConvKey`]: shape, stride, padding, type) the descriptors and, for each
//! of forward, backward-data and backward-filter, the algorithm cuDNN's heuristic
//! (`cudnnGet…Algorithm_v7`) ranks first among those that succeed, are **deterministic** (the
//! engine adds no floats in a run-dependent order: cuDNN's `ALGO_0` backward kernels use
//! atomics) and fit in [`MAX_WORKSPACE`] ([`choose`]), with its workspace size and math type.
//! Chosen once, kept in the context.
//!
//! Streams: a convolution runs on the calling thread's current stream (the student's, or the
//! teacher's inside a `cuda::on_stream` scope). cuDNN binds a handle to one stream
//! (`cudnnSetStream`: its kernels, and any internal streams it uses, are ordered on that
//! stream), and one handle must not run on two streams at once, so there is one handle per
//! stream role, bound once when made, each with its own workspace: calls on one stream run
//! one after another and share their workspace; a teacher's convolution and a student's may
//! run at once and never do. The plans (descriptors, chosen algorithms) are shared: they
//! describe problems, not streams.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cudnn::{result as dnn, sys};

use super::libs::{self, Library};
use super::{CudaContext, DeviceBuffer, StreamRole};
use crate::backend::Conv2dGeometry;
use crate::{DType, Error, Result};

/// The most workspace an algorithm may ask for.
pub(crate) const MAX_WORKSPACE: usize = 256 << 20;

/// The oldest cuDNN the bindings (cuDNN 9.x API) are for.
pub(crate) const MIN_CUDNN_VERSION: usize = 9_00_00;

/// One convolution problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    /// `[N, C, H, W]`, `[O, C, kh, kw]`, `[N, O, OH, OW]`.
    pub x: [c_int; 4],
    pub w: [c_int; 4],
    pub y: [c_int; 4],
    pub stride: c_int,
    pub padding: c_int,
    pub dtype: DType,
}

impl ConvKey {
    /// From the CPU op's geometry; an error when a size is beyond cuDNN's 32-bit dimensions.
    pub(crate) fn new(g: &Conv2dGeometry, dtype: DType) -> Result<ConvKey> {
        let i = |v: usize| {
            c_int::try_from(v).map_err(|_| {
                Error::invalid(
                    "conv2d (cuDNN)",
                    format!("{g:?}: {v} is beyond cuDNN's 32-bit dimensions"),
                )
            })
        };
        if dtype == DType::I32 {
            return Err(Error::DType {
                op: "conv2d",
                expected: DType::F32,
                got: dtype,
            });
        }
        for t in [g.n * g.c * g.h * g.w, g.n * g.o * g.oh * g.ow] {
            i(t)?; // cuDNN's legacy API indexes a tensor with 32-bit integers
        }
        Ok(ConvKey {
            x: [i(g.n)?, i(g.c)?, i(g.h)?, i(g.w)?],
            w: [i(g.o)?, i(g.c)?, i(g.kh)?, i(g.kw)?],
            y: [i(g.n)?, i(g.o)?, i(g.oh)?, i(g.ow)?],
            stride: i(g.stride)?,
            padding: i(g.padding)?,
            dtype,
        })
    }

    fn data_type(&self) -> sys::cudnnDataType_t {
        match self.dtype {
            DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            _ => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        }
    }

    /// Whether an algorithm ranked with math type `m` may run this problem: bf16 with any; f32
    /// not with the tensor-op math types (TF32 or down-conversion), and it then runs with FMA
    /// math ([`ConvKey::run_math`]) whatever it was ranked with.
    fn math_allowed(&self, m: sys::cudnnMathType_t) -> bool {
        use sys::cudnnMathType_t as M;
        self.dtype == DType::BF16 || matches!(m, M::CUDNN_FMA_MATH | M::CUDNN_DEFAULT_MATH)
    }

    /// The math type a chosen algorithm runs with (see [`ConvKey::math_allowed`]).
    fn run_math(&self, ranked: sys::cudnnMathType_t) -> sys::cudnnMathType_t {
        match self.dtype {
            DType::BF16 => ranked,
            _ => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        }
    }

    fn math(&self) -> sys::cudnnMathType_t {
        match self.dtype {
            DType::BF16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            _ => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        }
    }
}

/// One algorithm as the heuristic reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub ok: bool,
    pub deterministic: bool,
    pub memory: usize,
    /// Its math type is allowed for the problem's type: `_v7` may list algorithms of several
    /// math types, and for f32 the tensor-op ones are TF32 (10-bit mantissas).
    pub math_allowed: bool,
}

/// The first (best-ranked) candidate that succeeded, is deterministic, fits the workspace and
/// has an allowed math type.
pub(crate) fn choose(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .position(|c| c.ok && c.deterministic && c.memory <= MAX_WORKSPACE && c.math_allowed)
}

/// The three directions of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// An algorithm chosen for one direction: its number (the enum's value), math type and
/// workspace bytes.
#[derive(Debug, Clone, Copy)]
struct Chosen<A> {
    algo: A,
    math: sys::cudnnMathType_t,
    workspace: usize,
}

struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: Option<Chosen<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<Chosen<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<Chosen<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by `Plan::new` (null when not made), destroyed once, here.
        unsafe {
            if !self.x.is_null() {
                let _ = dnn::destroy_tensor_descriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = dnn::destroy_tensor_descriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = dnn::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = dnn::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

fn dnn_err(ordinal: usize, what: &str) -> impl Fn(dnn::CudnnError) -> Error + '_ {
    move |e| Error::Device(format!("cuda:{ordinal}: cuDNN {what}: {e:?}"))
}

const SUCCESS: sys::cudnnStatus_t = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
const DETERMINISTIC: sys::cudnnDeterminism_t = sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;

impl Plan {
    fn new(ordinal: usize, key: &ConvKey) -> Result<Plan> {
        let err = |w| dnn_err(ordinal, w);
        let mut plan = Plan {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
        };
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        plan.x = dnn::create_tensor_descriptor().map_err(err("creating a tensor descriptor"))?;
        plan.y = dnn::create_tensor_descriptor().map_err(err("creating a tensor descriptor"))?;
        plan.w = dnn::create_filter_descriptor().map_err(err("creating a filter descriptor"))?;
        plan.conv = dnn::create_convolution_descriptor()
            .map_err(err("creating a convolution descriptor"))?;
        let (s, p) = (key.stride, key.padding);
        // SAFETY: the descriptors were just made.
        unsafe {
            dnn::set_tensor4d_descriptor(plan.x, nchw, key.data_type(), key.x)
                .map_err(err("describing the input"))?;
            dnn::set_tensor4d_descriptor(plan.y, nchw, key.data_type(), key.y)
                .map_err(err("describing the output"))?;
            dnn::set_filter4d_descriptor(plan.w, key.data_type(), nchw, key.w)
                .map_err(err("describing the filter"))?;
            dnn::set_convolution2d_descriptor(
                plan.conv,
                p,
                p,
                s,
                s,
                1,
                1,
                // PyTorch's conv2d is a cross-correlation.
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(err("describing the convolution"))?;
            dnn::set_convolution_math_type(plan.conv, key.math())
                .map_err(err("setting the math type"))?;
        }
        Ok(plan)
    }

    /// Sets the math type the chosen algorithm runs with on the convolution descriptor: the
    /// workspace size is queried after this, since it depends on the math type (the
    /// heuristic's `memory` is for the math type it ranked with, which f32 replaces by FMA).
    fn run_math(&self, ordinal: usize, math: sys::cudnnMathType_t) -> Result<()> {
        // SAFETY: the descriptor is alive (made in `Plan::new`).
        unsafe { dnn::set_convolution_math_type(self.conv, math) }
            .map_err(dnn_err(ordinal, "setting the math type"))
    }

    /// The algorithm of `dir`, chosen on first use: the first of the heuristic's list that
    /// [`choose`] allows; its workspace is the size cuDNN asks for with the math type it runs
    /// with.
    fn choose(
        &mut self,
        ordinal: usize,
        handle: sys::cudnnHandle_t,
        key: &ConvKey,
        dir: Direction,
    ) -> Result<()> {
        let err = |w| dnn_err(ordinal, w);
        // One direction: its slot, perf type, heuristic and workspace query (`cudnnGet…`), and
        // the descriptors in the order both take.
        macro_rules! choose_for {
            ($slot:ident, $perf:ty, $get:ident, $size:ident, $what:literal, $d0:ident, $d1:ident, $d2:ident) => {{
                if self.$slot.is_some() {
                    return Ok(());
                }
                let mut perfs: [$perf; 8] = std::mem::zeroed();
                let mut count: c_int = 0;
                dnn::$get(
                    handle,
                    self.$d0,
                    self.$d1,
                    self.conv,
                    self.$d2,
                    perfs.len() as c_int,
                    &mut count,
                    perfs.as_mut_ptr(),
                )
                .map_err(err(concat!("cudnnGetConvolution", $what, "Algorithm_v7")))?;
                let perfs = &perfs[..(count.max(0) as usize).min(perfs.len())];
                let cands: Vec<Candidate> = perfs
                    .iter()
                    .map(|p| Candidate {
                        ok: p.status == SUCCESS,
                        deterministic: p.determinism == DETERMINISTIC,
                        memory: p.memory,
                        math_allowed: key.math_allowed(p.mathType),
                    })
                    .collect();
                let i = choose(&cands).ok_or_else(|| {
                    Error::Device(format!(
                        "cuda:{ordinal}: cuDNN offers no deterministic {dir:?} algorithm \
                         within {} MiB of workspace for {key:?}",
                        MAX_WORKSPACE >> 20
                    ))
                })?;
                let (algo, math) = (perfs[i].algo, key.run_math(perfs[i].mathType));
                self.run_math(ordinal, math)?;
                let workspace =
                    dnn::$size(handle, self.$d0, self.$d1, self.conv, self.$d2, algo)
                        .map_err(err(concat!("cudnnGetConvolution", $what, "WorkspaceSize")))?;
                self.$slot = Some(Chosen {
                    algo,
                    math,
                    workspace,
                });
            }};
        }
        // SAFETY (each arm): the descriptors are alive; the perf arrays hold as many entries
        // as requested; zeroed perf structs are valid values (every enum has a 0 variant).
        unsafe {
            match dir {
                Direction::Forward => choose_for!(
                    fwd,
                    sys::cudnnConvolutionFwdAlgoPerf_t,
                    get_convolution_forward_algorithm,
                    get_convolution_forward_workspace_size,
                    "Forward",
                    x,
                    w,
                    y
                ),
                Direction::BackwardData => choose_for!(
                    bwd_data,
                    sys::cudnnConvolutionBwdDataAlgoPerf_t,
                    get_convolution_backward_data_algorithm,
                    get_convolution_backward_data_workspace_size,
                    "BackwardData",
                    w,
                    y,
                    x
                ),
                Direction::BackwardFilter => choose_for!(
                    bwd_filter,
                    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                    get_convolution_backward_filter_algorithm,
                    get_convolution_backward_filter_workspace_size,
                    "BackwardFilter",
                    x,
                    y,
                    w
                ),
            }
        }
        Ok(())
    }
}

/// A cuDNN handle bound to one stream role's stream, and that stream's workspace.
struct RoleHandle {
    handle: sys::cudnnHandle_t,
    // Holds an `Arc` of its own context (a cycle): contexts live for the process anyway.
    // Allocated, grown and freed on the handle's stream.
    workspace: Option<DeviceBuffer>,
}

impl Drop for RoleHandle {
    fn drop(&mut self) {
        // SAFETY: made by `dnn::create_handle`, destroyed once.
        unsafe {
            let _ = dnn::destroy_handle(self.handle);
        }
    }
}

/// The cuDNN state of a context: a handle per stream role (made on the role's first
/// convolution), the plans.
pub(crate) struct Dnn {
    handles: [Option<RoleHandle>; StreamRole::COUNT],
    plans: HashMap<ConvKey, Plan>,
}

// SAFETY: cuDNN objects are usable from any thread, one at a time: the context keeps `Dnn`
// behind a mutex.
unsafe impl Send for Dnn {}

impl Drop for Dnn {
    fn drop(&mut self) {
        // The descriptors, then the handles (as before: plans first).
        self.plans.clear();
        for h in &mut self.handles {
            h.take();
        }
    }
}

impl Dnn {
    /// Checks that cuDNN is there and recent enough; no handle yet.
    fn new(ordinal: usize) -> Result<Dnn> {
        libs::require(Library::Cudnn, ordinal)?;
        libs::guarded(Library::Cudnn, ordinal, || {
            let version = dnn::get_version();
            if version < MIN_CUDNN_VERSION {
                return Err(Error::Device(libs::cudnn_too_old_message(ordinal, version)));
            }
            Ok(Dnn {
                handles: Default::default(),
                plans: HashMap::new(),
            })
        })
    }

    /// The handle of the calling thread's current stream role, made and bound on first use.
    fn role_handle(&mut self, ctx: &CudaContext) -> Result<&mut RoleHandle> {
        let ordinal = ctx.ordinal();
        let role = ctx.current_role();
        let slot = &mut self.handles[role.index()];
        if slot.is_none() {
            ctx.bind()?;
            let made = libs::guarded(Library::Cudnn, ordinal, || {
                let handle = dnn::create_handle().map_err(dnn_err(ordinal, "cudnnCreate"))?;
                let made = RoleHandle {
                    handle,
                    workspace: None,
                };
                // SAFETY: the handle was just made; the stream belongs to the current context
                // and lives as long as it.
                unsafe {
                    dnn::set_stream(handle, ctx.stream(role).cu_stream() as sys::cudaStream_t)
                }
                .map_err(dnn_err(ordinal, "cudnnSetStream"))?;
                Ok(made)
            })?;
            *slot = Some(made);
        }
        Ok(slot.as_mut().expect("made above"))
    }
}

/// The device addresses of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvPtrs {
    pub x: u64,
    pub w: u64,
    pub y: u64,
}

/// Runs one direction of the convolution `key` on `ctx`'s current stream (with that stream's
/// handle and workspace): forward writes `y` from `x` and `w`; backward-data writes `x` (dx)
/// from `w` and `y` (dy); backward-filter writes `w` (dw) from `x` and `y` (dy). Every tensor
/// must be non-empty.
pub(crate) fn convolve(
    ctx: &Arc<CudaContext>,
    key: &ConvKey,
    dir: Direction,
    p: ConvPtrs,
) -> Result<()> {
    let ordinal = ctx.ordinal();
    let mut guard = ctx.dnn.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Dnn::new(ordinal)?);
    }
    let state = guard.as_mut().expect("made above");
    let handle = state.role_handle(ctx)?.handle;
    ctx.bind()?;
    if !state.plans.contains_key(key) {
        let plan = libs::guarded(Library::Cudnn, ordinal, || Plan::new(ordinal, key))?;
        state.plans.insert(*key, plan);
    }
    let plan = state.plans.get_mut(key).expect("inserted above");
    libs::guarded(Library::Cudnn, ordinal, || {
        plan.choose(ordinal, handle, key, dir)
    })?;
    let (math, workspace) = match dir {
        Direction::Forward => plan.fwd.map(|c| (c.math, c.workspace)),
        Direction::BackwardData => plan.bwd_data.map(|c| (c.math, c.workspace)),
        Direction::BackwardFilter => plan.bwd_filter.map(|c| (c.math, c.workspace)),
    }
    .expect("chosen above");
    let role = state.role_handle(ctx)?;
    let ws = DeviceBuffer::workspace(ctx, &mut role.workspace, workspace)? as *mut c_void;
    let plan = &state.plans[key];
    let err = dnn_err(ordinal, "convolution");
    let (alpha, beta) = (1f32, 0f32);
    let (a, b) = (
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
    );
    // cudarc resolves a symbol on its first call (and panics when it is missing): guarded.
    // SAFETY: the descriptors describe the buffers (the same key the caller derived from the
    // tensors' shapes and type); every pointer is a live device allocation whose free is
    // ordered after this call on the handle's stream; the workspace holds `workspace` bytes.
    libs::guarded(Library::Cudnn, ordinal, || unsafe {
        // The heuristic's algorithm runs with the math type it was ranked with.
        dnn::set_convolution_math_type(plan.conv, math).map_err(dnn_err(ordinal, "math type"))?;
        // Reads the first two, writes the third (descriptor and address alike).
        macro_rules! run {
            ($f:ident, $slot:ident, $in0:ident, $in1:ident, $out:ident) => {
                dnn::$f(
                    handle,
                    a,
                    plan.$in0,
                    p.$in0 as *const c_void,
                    plan.$in1,
                    p.$in1 as *const c_void,
                    plan.conv,
                    plan.$slot.expect("chosen").algo,
                    ws,
                    workspace,
                    b,
                    plan.$out,
                    p.$out as *mut c_void,
                )
            };
        }
        match dir {
            Direction::Forward => run!(convolution_forward, fwd, x, w, y),
            Direction::BackwardData => run!(convolution_backward_data, bwd_data, w, y, x),
            Direction::BackwardFilter => run!(convolution_backward_filter, bwd_filter, x, y, w),
        }
        .map_err(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Conv2dOptions;

    #[test]
    fn keys_follow_the_cpu_geometry() {
        let g = Conv2dGeometry::new(
            &[8, 3, 32, 32],
            &[16, 3, 3, 3],
            Conv2dOptions {
                stride: 2,
                padding: 1,
            },
        )
        .unwrap();
        let k = ConvKey::new(&g, DType::BF16).unwrap();
        assert_eq!(k.x, [8, 3, 32, 32]);
        assert_eq!(k.w, [16, 3, 3, 3]);
        assert_eq!(k.y, [8, 16, 16, 16]);
        assert_eq!((k.stride, k.padding), (2, 1));
        assert_eq!(k.data_type(), sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16);
        assert_eq!(k.math(), sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH);
        assert!(k.math_allowed(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH));
        let k = ConvKey::new(&g, DType::F32).unwrap();
        // No TF32 for f32 convolutions.
        assert_eq!(k.math(), sys::cudnnMathType_t::CUDNN_FMA_MATH);
        assert!(k.math_allowed(sys::cudnnMathType_t::CUDNN_FMA_MATH));
        assert!(k.math_allowed(sys::cudnnMathType_t::CUDNN_DEFAULT_MATH));
        assert_eq!(
            k.run_math(sys::cudnnMathType_t::CUDNN_DEFAULT_MATH),
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        );
        for m in [
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        ] {
            assert!(!k.math_allowed(m), "{m:?}");
        }
        assert!(ConvKey::new(&g, DType::I32).is_err());
        // 2^31 elements: beyond the legacy API's indexing.
        let big = Conv2dGeometry::new(
            &[1 << 11, 64, 128, 128],
            &[64, 64, 1, 1],
            Conv2dOptions::default(),
        )
        .unwrap();
        assert!(ConvKey::new(&big, DType::F32).is_err());
    }

    #[test]
    fn the_first_deterministic_algorithm_that_fits_is_chosen() {
        let c = |ok, deterministic, memory| Candidate {
            ok,
            deterministic,
            memory,
            math_allowed: true,
        };
        let list = [
            c(true, false, 0),                // fastest, but atomics
            c(false, true, 0),                // not supported for this problem
            c(true, true, MAX_WORKSPACE + 1), // too much workspace
            c(true, true, 1 << 20),           // this one
            c(true, true, 0),
        ];
        assert_eq!(choose(&list), Some(3));
        // The same list where the candidate ranked 3 would use TF32 for an f32 problem.
        let mut tf32 = list;
        tf32[3].math_allowed = false;
        assert_eq!(choose(&tf32), Some(4));
        assert_eq!(choose(&list[..3]), None);
        assert_eq!(choose(&[]), None);
    }
}
