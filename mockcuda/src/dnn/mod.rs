//! The mock cuDNN 9 (`libcudnn.so.9`), legacy convolution API: handles bound to a stream,
//! tensor, filter and convolution descriptors, the output-size query, the `_v7` algorithm
//! queries and workspace sizes, and forward, backward-data and backward-filter with
//! alpha/beta, on fp32 or bf16 data with fp32 compute.
//!
//! - `desc`: descriptors, the problem's checks, the mock's algorithms;
//! - `compute`: the three directions on host values;
//! - here: the exported entry points; a convolution is queued on the handle's stream with the
//!   byte ranges it reads and writes (and its workspace).
//!
//! Math types are modelled where they change results: fp32 data under a math type that
//! permits tensor cores is read as TF32, `CUDNN_FMA_MATH` never is.

// The entry points' contracts are NVIDIA's documentation of the C API.
#![allow(clippy::missing_safety_doc)]

pub mod compute;
pub mod desc;
#[cfg(test)]
mod tests;

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::unimplemented;
use crate::libcommon::{explain, HostRange, Registry};
use crate::stream::{enqueue, Access};

use desc::{
    ConvDesc, Direction, Problem, Refusal, Status, TensorDesc, BAD_PARAM, EXECUTION_FAILED,
    NOT_INITIALIZED, NOT_SUPPORTED, SUCCESS,
};

/// The version reported: cuDNN 9.2.1 (`major * 10000 + minor * 100 + patch`), the API the
/// bindings are for.
pub const VERSION: usize = 9_02_01;

/// A handle: the stream its work is queued on (null: the legacy default stream).
static HANDLES: Registry<usize> = Registry::new();
static TENSORS: Registry<TensorDesc> = Registry::new();
static FILTERS: Registry<TensorDesc> = Registry::new();
static CONVS: Registry<ConvDesc> = Registry::new();

/// Counts the runs of non-deterministic algorithms: each starts its summation elsewhere.
static ROTATION: AtomicUsize = AtomicUsize::new(0);

/// `cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t` (one layout for the three).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AlgoPerf {
    pub algo: u32,
    pub status: Status,
    pub time: f32,
    pub memory: usize,
    pub determinism: u32,
    pub math_type: u32,
    pub reserved: [c_int; 3],
}

// The C layout of cudnn.h: enum, status, float, (padding), size_t, two enums, int[3].
const _: () = assert!(std::mem::size_of::<AlgoPerf>() == 48);

fn refuse(function: &str, (status, msg): Refusal) -> Status {
    explain("cuDNN", function, &msg);
    status
}

fn status_of(function: &str, r: Result<(), Refusal>) -> Status {
    match r {
        Ok(()) => SUCCESS,
        Err(e) => refuse(function, e),
    }
}

/// The name of a status, NUL-terminated.
pub fn status_name(status: Status) -> &'static str {
    match status {
        SUCCESS => "CUDNN_STATUS_SUCCESS\0",
        NOT_INITIALIZED => "CUDNN_STATUS_NOT_INITIALIZED\0",
        BAD_PARAM => "CUDNN_STATUS_BAD_PARAM\0",
        EXECUTION_FAILED => "CUDNN_STATUS_EXECUTION_FAILED\0",
        NOT_SUPPORTED => "CUDNN_STATUS_NOT_SUPPORTED\0",
        _ => "CUDNN_STATUS_UNKNOWN\0",
    }
}

#[no_mangle]
pub extern "C" fn cudnnGetVersion() -> usize {
    VERSION
}

#[no_mangle]
pub extern "C" fn cudnnGetErrorString(status: Status) -> *const c_char {
    status_name(status).as_ptr() as *const c_char
}

unsafe fn make<T: Clone>(reg: &Registry<T>, out: *mut *mut c_void, v: T) -> Status {
    if out.is_null() {
        return BAD_PARAM;
    }
    *out = reg.insert(v);
    SUCCESS
}

fn destroy<T: Clone>(reg: &Registry<T>, h: *mut c_void, function: &str) -> Status {
    if h.is_null() || reg.remove(h).is_some() {
        SUCCESS
    } else {
        refuse(
            function,
            (BAD_PARAM, format!("{h:?} is not a live descriptor")),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreate(handle: *mut *mut c_void) -> Status {
    make(&HANDLES, handle, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroy(handle: *mut c_void) -> Status {
    if HANDLES.remove(handle).is_some() {
        SUCCESS
    } else {
        refuse(
            "cudnnDestroy",
            (BAD_PARAM, format!("{handle:?} is not a live handle")),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetStream(handle: *mut c_void, stream: *mut c_void) -> Status {
    match HANDLES.update(handle, |s| *s = stream as usize) {
        Some(()) => SUCCESS,
        None => refuse(
            "cudnnSetStream",
            (BAD_PARAM, format!("{handle:?} is not a live handle")),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetStream(handle: *mut c_void, stream: *mut *mut c_void) -> Status {
    match (HANDLES.get(handle), stream.is_null()) {
        (Some(s), false) => {
            *stream = s as *mut c_void;
            SUCCESS
        }
        _ => refuse(
            "cudnnGetStream",
            (BAD_PARAM, "a dead handle or a null output".into()),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateTensorDescriptor(desc: *mut *mut c_void) -> Status {
    make(&TENSORS, desc, None)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyTensorDescriptor(desc: *mut c_void) -> Status {
    destroy(&TENSORS, desc, "cudnnDestroyTensorDescriptor")
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateFilterDescriptor(desc: *mut *mut c_void) -> Status {
    make(&FILTERS, desc, None)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyFilterDescriptor(desc: *mut c_void) -> Status {
    destroy(&FILTERS, desc, "cudnnDestroyFilterDescriptor")
}

#[no_mangle]
pub unsafe extern "C" fn cudnnCreateConvolutionDescriptor(desc: *mut *mut c_void) -> Status {
    make(&CONVS, desc, ConvDesc::default())
}

#[no_mangle]
pub unsafe extern "C" fn cudnnDestroyConvolutionDescriptor(desc: *mut c_void) -> Status {
    destroy(&CONVS, desc, "cudnnDestroyConvolutionDescriptor")
}

/// Sets a tensor or filter descriptor of `reg`.
fn set_tensor(
    reg: &Registry<TensorDesc>,
    function: &str,
    desc: *mut c_void,
    value: Result<compute::Tensor4, Refusal>,
) -> Status {
    let r = value.and_then(|t| {
        reg.update(desc, |d| *d = Some(t))
            .ok_or((BAD_PARAM, format!("{desc:?} is not a live descriptor")))
    });
    status_of(function, r)
}

/// `cudnnTensorFormat_t`: NCHW = 0, NHWC = 1; others are not modelled.
fn nhwc(function: &str, format: u32) -> bool {
    match format {
        0 => false,
        1 => true,
        other => unimplemented(
            function,
            &format!("tensor format {other} (NCHW = 0 and NHWC = 1 are modelled)"),
        ),
    }
}

/// Four dims from an Nd call (the mock's convolutions are 2-d).
unsafe fn four(function: &str, nb: c_int, a: *const c_int) -> Option<[i32; 4]> {
    if nb != 4 {
        unimplemented(
            function,
            &format!("{nb} dims (the mock models 4-d tensors and filters)"),
        );
    }
    (!a.is_null()).then(|| std::array::from_fn(|i| *a.add(i)))
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetTensor4dDescriptor(
    desc: *mut c_void,
    format: u32,
    data_type: u32,
    n: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
) -> Status {
    const F: &str = "cudnnSetTensor4dDescriptor";
    let t = desc::tensor(
        desc::elem_of(F, data_type),
        [n, c, h, w],
        None,
        nhwc(F, format),
    );
    set_tensor(&TENSORS, F, desc, t)
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnSetTensor4dDescriptorEx(
    desc: *mut c_void,
    data_type: u32,
    n: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
    ns: c_int,
    cs: c_int,
    hs: c_int,
    ws: c_int,
) -> Status {
    const F: &str = "cudnnSetTensor4dDescriptorEx";
    let t = desc::tensor(
        desc::elem_of(F, data_type),
        [n, c, h, w],
        Some([ns, cs, hs, ws]),
        false,
    );
    set_tensor(&TENSORS, F, desc, t)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetTensorNdDescriptor(
    desc: *mut c_void,
    data_type: u32,
    nb_dims: c_int,
    dims: *const c_int,
    strides: *const c_int,
) -> Status {
    const F: &str = "cudnnSetTensorNdDescriptor";
    let elem = desc::elem_of(F, data_type);
    let (Some(d), Some(s)) = (four(F, nb_dims, dims), four(F, nb_dims, strides)) else {
        return refuse(F, (BAD_PARAM, "null dims or strides".into()));
    };
    set_tensor(&TENSORS, F, desc, desc::tensor(elem, d, Some(s), false))
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetFilter4dDescriptor(
    desc: *mut c_void,
    data_type: u32,
    format: u32,
    k: c_int,
    c: c_int,
    h: c_int,
    w: c_int,
) -> Status {
    const F: &str = "cudnnSetFilter4dDescriptor";
    let t = desc::tensor(
        desc::elem_of(F, data_type),
        [k, c, h, w],
        None,
        nhwc(F, format),
    );
    set_tensor(&FILTERS, F, desc, t)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetFilterNdDescriptor(
    desc: *mut c_void,
    data_type: u32,
    format: u32,
    nb_dims: c_int,
    dims: *const c_int,
) -> Status {
    const F: &str = "cudnnSetFilterNdDescriptor";
    let elem = desc::elem_of(F, data_type);
    let Some(d) = four(F, nb_dims, dims) else {
        return refuse(F, (BAD_PARAM, "null dims".into()));
    };
    set_tensor(
        &FILTERS,
        F,
        desc,
        desc::tensor(elem, d, None, nhwc(F, format)),
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnSetConvolution2dDescriptor(
    desc: *mut c_void,
    pad_h: c_int,
    pad_w: c_int,
    u: c_int,
    v: c_int,
    dilation_h: c_int,
    dilation_w: c_int,
    mode: u32,
    compute_type: u32,
) -> Status {
    const F: &str = "cudnnSetConvolution2dDescriptor";
    let r = CONVS
        .update(desc, |d| {
            desc::set_conv(
                d,
                [pad_h, pad_w],
                [u, v],
                [dilation_h, dilation_w],
                mode,
                compute_type,
            )
        })
        .unwrap_or_else(|| {
            Err((
                BAD_PARAM,
                format!("{desc:?} is not a live convolution descriptor"),
            ))
        });
    status_of(F, r)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionNdDescriptor(
    desc: *mut c_void,
    array_length: c_int,
    pad: *const c_int,
    stride: *const c_int,
    dilation: *const c_int,
    mode: u32,
    compute_type: u32,
) -> Status {
    const F: &str = "cudnnSetConvolutionNdDescriptor";
    if array_length != 2 {
        unimplemented(
            F,
            &format!("{array_length} spatial dims (the mock models 2-d convolutions)"),
        );
    }
    if pad.is_null() || stride.is_null() || dilation.is_null() {
        return refuse(F, (BAD_PARAM, "a null array".into()));
    }
    let two = |a: *const c_int| [*a, *a.add(1)];
    let r = CONVS
        .update(desc, |d| {
            desc::set_conv(d, two(pad), two(stride), two(dilation), mode, compute_type)
        })
        .unwrap_or_else(|| {
            Err((
                BAD_PARAM,
                format!("{desc:?} is not a live convolution descriptor"),
            ))
        });
    status_of(F, r)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionGroupCount(desc: *mut c_void, groups: c_int) -> Status {
    const F: &str = "cudnnSetConvolutionGroupCount";
    if groups < 1 {
        return refuse(F, (BAD_PARAM, format!("group count {groups}")));
    }
    let r = CONVS.update(desc, |d| d.groups = groups).ok_or((
        BAD_PARAM,
        format!("{desc:?} is not a live convolution descriptor"),
    ));
    status_of(F, r)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnSetConvolutionMathType(desc: *mut c_void, math: u32) -> Status {
    const F: &str = "cudnnSetConvolutionMathType";
    if math > desc::FMA_MATH {
        return refuse(F, (BAD_PARAM, format!("math type {math}")));
    }
    let r = CONVS.update(desc, |d| d.math = math).ok_or((
        BAD_PARAM,
        format!("{desc:?} is not a live convolution descriptor"),
    ));
    status_of(F, r)
}

/// The output dims, for the two output-dim queries.
fn out_dims(conv: *mut c_void, x: *mut c_void, w: *mut c_void) -> Result<[usize; 4], Refusal> {
    let conv = CONVS
        .get(conv)
        .ok_or((BAD_PARAM, "a dead convolution descriptor".to_string()))?;
    let x = TENSORS
        .get(x)
        .ok_or((BAD_PARAM, "a dead tensor descriptor".to_string()))?;
    let w = FILTERS
        .get(w)
        .ok_or((BAD_PARAM, "a dead filter descriptor".to_string()))?;
    desc::output_dims(&x, &w, &conv)
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolution2dForwardOutputDim(
    conv: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    n: *mut c_int,
    c: *mut c_int,
    h: *mut c_int,
    wd: *mut c_int,
) -> Status {
    const F: &str = "cudnnGetConvolution2dForwardOutputDim";
    if [n, c, h, wd].iter().any(|p| p.is_null()) {
        return refuse(F, (BAD_PARAM, "a null output".into()));
    }
    match out_dims(conv, x, w) {
        Ok(d) => {
            for (p, v) in [n, c, h, wd].into_iter().zip(d) {
                *p = v as c_int;
            }
            SUCCESS
        }
        Err(e) => refuse(F, e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionNdForwardOutputDim(
    conv: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    nb_dims: c_int,
    out: *mut c_int,
) -> Status {
    const F: &str = "cudnnGetConvolutionNdForwardOutputDim";
    if nb_dims != 4 || out.is_null() {
        return refuse(
            F,
            (
                BAD_PARAM,
                format!("{nb_dims} dims or a null output (4-d only)"),
            ),
        );
    }
    match out_dims(conv, x, w) {
        Ok(d) => {
            for (i, v) in d.into_iter().enumerate() {
                *out.add(i) = v as c_int;
            }
            SUCCESS
        }
        Err(e) => refuse(F, e),
    }
}

unsafe fn max_count(handle: *mut c_void, count: *mut c_int, dir: Direction) -> Status {
    if HANDLES.get(handle).is_none() || count.is_null() {
        return BAD_PARAM;
    }
    *count = dir.algo_count() as c_int;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionForwardAlgorithmMaxCount(
    handle: *mut c_void,
    count: *mut c_int,
) -> Status {
    max_count(handle, count, Direction::Forward)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataAlgorithmMaxCount(
    handle: *mut c_void,
    count: *mut c_int,
) -> Status {
    max_count(handle, count, Direction::BackwardData)
}

#[no_mangle]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(
    handle: *mut c_void,
    count: *mut c_int,
) -> Status {
    max_count(handle, count, Direction::BackwardFilter)
}

/// The problem the descriptors name: `x` and `y` tensors, `w` a filter.
fn lookup(
    handle: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    conv: *mut c_void,
    y: *mut c_void,
) -> Result<(usize, Problem), Refusal> {
    let stream = HANDLES
        .get(handle)
        .ok_or((BAD_PARAM, format!("{handle:?} is not a live cuDNN handle")))?;
    let dead = |what: &str| (BAD_PARAM, format!("the {what} descriptor is not live"));
    let xd = TENSORS.get(x).ok_or_else(|| dead("x"))?;
    let wd = FILTERS.get(w).ok_or_else(|| dead("filter"))?;
    let cd = CONVS.get(conv).ok_or_else(|| dead("convolution"))?;
    let yd = TENSORS.get(y).ok_or_else(|| dead("y"))?;
    Ok((stream, desc::problem(&xd, &wd, &cd, &yd)?))
}

/// `cudnnGet*Algorithm_v7`: the mock's algorithms, best first.
unsafe fn get_v7(
    function: &str,
    dir: Direction,
    found: Result<(usize, Problem), Refusal>,
    requested: c_int,
    returned: *mut c_int,
    perfs: *mut AlgoPerf,
) -> Status {
    let p = match found {
        Ok((_, p)) => p,
        Err(e) => return refuse(function, e),
    };
    if requested <= 0 || returned.is_null() || perfs.is_null() {
        return refuse(
            function,
            (
                BAD_PARAM,
                format!("requestedAlgoCount {requested} or a null output"),
            ),
        );
    }
    let list = desc::algorithms(dir, &p);
    let n = list.len().min(requested as usize);
    for (i, a) in list.iter().take(n).enumerate() {
        *perfs.add(i) = AlgoPerf {
            algo: a.algo,
            status: if a.supported { SUCCESS } else { NOT_SUPPORTED },
            // A heuristic, not a measurement.
            time: -1.0,
            memory: a.workspace,
            determinism: a.deterministic as u32,
            math_type: p.math,
            reserved: [0; 3],
        };
    }
    *returned = n as c_int;
    SUCCESS
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionForwardAlgorithm_v7(
    handle: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    conv: *mut c_void,
    y: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perfs: *mut AlgoPerf,
) -> Status {
    let found = lookup(handle, x, w, conv, y);
    get_v7(
        "cudnnGetConvolutionForwardAlgorithm_v7",
        Direction::Forward,
        found,
        requested,
        returned,
        perfs,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataAlgorithm_v7(
    handle: *mut c_void,
    w: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dx: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perfs: *mut AlgoPerf,
) -> Status {
    let found = lookup(handle, dx, w, conv, dy);
    get_v7(
        "cudnnGetConvolutionBackwardDataAlgorithm_v7",
        Direction::BackwardData,
        found,
        requested,
        returned,
        perfs,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterAlgorithm_v7(
    handle: *mut c_void,
    x: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dw: *mut c_void,
    requested: c_int,
    returned: *mut c_int,
    perfs: *mut AlgoPerf,
) -> Status {
    let found = lookup(handle, x, dw, conv, dy);
    get_v7(
        "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
        Direction::BackwardFilter,
        found,
        requested,
        returned,
        perfs,
    )
}

unsafe fn workspace_size(
    function: &str,
    dir: Direction,
    found: Result<(usize, Problem), Refusal>,
    algo: u32,
    size: *mut usize,
) -> Status {
    if size.is_null() {
        return refuse(function, (BAD_PARAM, "a null output".into()));
    }
    match found.and_then(|(_, p)| desc::algorithm(dir, &p, algo)) {
        Ok(a) => {
            *size = a.workspace;
            SUCCESS
        }
        Err(e) => refuse(function, e),
    }
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionForwardWorkspaceSize(
    handle: *mut c_void,
    x: *mut c_void,
    w: *mut c_void,
    conv: *mut c_void,
    y: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> Status {
    let found = lookup(handle, x, w, conv, y);
    workspace_size(
        "cudnnGetConvolutionForwardWorkspaceSize",
        Direction::Forward,
        found,
        algo,
        size,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardDataWorkspaceSize(
    handle: *mut c_void,
    w: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dx: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> Status {
    let found = lookup(handle, dx, w, conv, dy);
    workspace_size(
        "cudnnGetConvolutionBackwardDataWorkspaceSize",
        Direction::BackwardData,
        found,
        algo,
        size,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnGetConvolutionBackwardFilterWorkspaceSize(
    handle: *mut c_void,
    x: *mut c_void,
    dy: *mut c_void,
    conv: *mut c_void,
    dw: *mut c_void,
    algo: u32,
    size: *mut usize,
) -> Status {
    let found = lookup(handle, x, dw, conv, dy);
    workspace_size(
        "cudnnGetConvolutionBackwardFilterWorkspaceSize",
        Direction::BackwardFilter,
        found,
        algo,
        size,
    )
}

/// One call's device addresses: the tensors in the problem's roles (x, w, y), whichever of
/// them the direction reads or writes, and the workspace.
#[derive(Debug, Clone, Copy)]
pub struct Ptrs {
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub workspace: u64,
    pub workspace_size: usize,
}

/// Checks a call beyond its descriptors: the algorithm, the workspace, the scalars.
pub fn check_call(
    dir: Direction,
    p: &Problem,
    algo: u32,
    ptrs: &Ptrs,
) -> Result<desc::AlgoInfo, Refusal> {
    let info = desc::algorithm(dir, p, algo)?;
    if ptrs.workspace_size < info.workspace {
        return Err((
            BAD_PARAM,
            format!(
                "{dir:?} algorithm {algo} needs {} bytes of workspace, {} were given",
                info.workspace, ptrs.workspace_size
            ),
        ));
    }
    if ptrs.workspace == 0 && ptrs.workspace_size > 0 {
        return Err((
            BAD_PARAM,
            "the workspace is null with a non-zero size".into(),
        ));
    }
    if ptrs.x == 0 || ptrs.w == 0 || ptrs.y == 0 {
        return Err((BAD_PARAM, "a null tensor".into()));
    }
    Ok(info)
}

#[allow(clippy::too_many_arguments)]
unsafe fn run(
    function: &'static str,
    dir: Direction,
    found: Result<(usize, Problem), Refusal>,
    alpha: *const c_void,
    beta: *const c_void,
    algo: u32,
    ptrs: Ptrs,
) -> Status {
    let (stream, p) = match found {
        Ok(v) => v,
        Err(e) => return refuse(function, e),
    };
    if alpha.is_null() || beta.is_null() {
        return refuse(function, (BAD_PARAM, "alpha or beta is null".into()));
    }
    // fp32 and bf16 data take fp32 scaling factors.
    let (alpha, beta) = (*(alpha as *const f32), *(beta as *const f32));
    let info = match check_call(dir, &p, algo, &ptrs) {
        Ok(i) => i,
        Err(e) => return refuse(function, e),
    };
    match queue(function, dir, stream, &p, alpha, beta, info, ptrs) {
        Ok(()) => SUCCESS,
        Err(msg) => refuse(function, (EXECUTION_FAILED, msg)),
    }
}

#[allow(clippy::too_many_arguments)]
fn queue(
    function: &'static str,
    dir: Direction,
    stream: usize,
    p: &Problem,
    alpha: f32,
    beta: f32,
    info: desc::AlgoInfo,
    ptrs: Ptrs,
) -> Result<(), String> {
    let err = |e: crate::error::MockError| e.0;
    let resolve = |what: &str, ptr, t: &compute::Tensor4| {
        HostRange::resolve(ptr, t.span_bytes(), &format!("{function} {what}")).map_err(err)
    };
    let xr = resolve("x", ptrs.x, &p.x)?;
    let wr = resolve("w", ptrs.w, &p.w)?;
    let yr = resolve("y", ptrs.y, &p.y)?;
    HostRange::resolve(
        ptrs.workspace,
        info.workspace,
        &format!("{function} workspace"),
    )
    .map_err(err)?;
    let (reads, out): (Vec<(u64, usize)>, (u64, usize)) = match dir {
        Direction::Forward => (vec![(ptrs.x, xr.len), (ptrs.w, wr.len)], (ptrs.y, yr.len)),
        Direction::BackwardData => (vec![(ptrs.w, wr.len), (ptrs.y, yr.len)], (ptrs.x, xr.len)),
        Direction::BackwardFilter => (vec![(ptrs.x, xr.len), (ptrs.y, yr.len)], (ptrs.w, wr.len)),
    };
    let mut accesses: Vec<Access> = reads.iter().map(|&(a, n)| Access::Read(a, n)).collect();
    if beta != 0.0 {
        accesses.push(Access::Read(out.0, out.1));
    }
    accesses.push(Access::Write(out.0, out.1));
    if info.workspace > 0 {
        accesses.push(Access::Write(ptrs.workspace, info.workspace));
    }
    let rotate = if info.deterministic {
        0
    } else {
        ROTATION.fetch_add(1, Ordering::Relaxed)
    };
    let p = *p;
    let g = p.geometry;
    let name = format!(
        "{function} x {:?} w {:?} ({:?}, algorithm {})",
        g.x, g.w, p.x.elem, info.algo
    );
    enqueue(
        stream as *mut c_void,
        name,
        accesses,
        Box::new(move || {
            let tf32 = p.tf32();
            // SAFETY: each range was resolved inside a live allocation when queued; the race
            // detector orders this work after the writes it reads and before any free. The
            // inputs are gathered (their views dropped) before the output is written.
            unsafe {
                match dir {
                    Direction::Forward => {
                        let y = compute::forward(
                            &g,
                            &p.x.gather(xr.bytes(), tf32),
                            &p.w.gather(wr.bytes(), tf32),
                        );
                        p.y.blend(&y, alpha, beta, yr.bytes_mut());
                    }
                    Direction::BackwardData => {
                        let dx = compute::backward_data(
                            &g,
                            &p.w.gather(wr.bytes(), tf32),
                            &p.y.gather(yr.bytes(), tf32),
                            rotate,
                        );
                        p.x.blend(&dx, alpha, beta, xr.bytes_mut());
                    }
                    Direction::BackwardFilter => {
                        let dw = compute::backward_filter(
                            &g,
                            &p.x.gather(xr.bytes(), tf32),
                            &p.y.gather(yr.bytes(), tf32),
                            rotate,
                        );
                        p.w.blend(&dw, alpha, beta, wr.bytes_mut());
                    }
                }
            }
            Ok(())
        }),
    )
    .map_err(err)
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnConvolutionForward(
    handle: *mut c_void,
    alpha: *const c_void,
    x_desc: *mut c_void,
    x: *const c_void,
    w_desc: *mut c_void,
    w: *const c_void,
    conv: *mut c_void,
    algo: u32,
    workspace: *mut c_void,
    workspace_size: usize,
    beta: *const c_void,
    y_desc: *mut c_void,
    y: *mut c_void,
) -> Status {
    let found = lookup(handle, x_desc, w_desc, conv, y_desc);
    let ptrs = Ptrs {
        x: x as u64,
        w: w as u64,
        y: y as u64,
        workspace: workspace as u64,
        workspace_size,
    };
    run(
        "cudnnConvolutionForward",
        Direction::Forward,
        found,
        alpha,
        beta,
        algo,
        ptrs,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnConvolutionBackwardData(
    handle: *mut c_void,
    alpha: *const c_void,
    w_desc: *mut c_void,
    w: *const c_void,
    dy_desc: *mut c_void,
    dy: *const c_void,
    conv: *mut c_void,
    algo: u32,
    workspace: *mut c_void,
    workspace_size: usize,
    beta: *const c_void,
    dx_desc: *mut c_void,
    dx: *mut c_void,
) -> Status {
    let found = lookup(handle, dx_desc, w_desc, conv, dy_desc);
    let ptrs = Ptrs {
        x: dx as u64,
        w: w as u64,
        y: dy as u64,
        workspace: workspace as u64,
        workspace_size,
    };
    run(
        "cudnnConvolutionBackwardData",
        Direction::BackwardData,
        found,
        alpha,
        beta,
        algo,
        ptrs,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cudnnConvolutionBackwardFilter(
    handle: *mut c_void,
    alpha: *const c_void,
    x_desc: *mut c_void,
    x: *const c_void,
    dy_desc: *mut c_void,
    dy: *const c_void,
    conv: *mut c_void,
    algo: u32,
    workspace: *mut c_void,
    workspace_size: usize,
    beta: *const c_void,
    dw_desc: *mut c_void,
    dw: *mut c_void,
) -> Status {
    let found = lookup(handle, x_desc, dw_desc, conv, dy_desc);
    let ptrs = Ptrs {
        x: x as u64,
        w: dw as u64,
        y: dy as u64,
        workspace: workspace as u64,
        workspace_size,
    };
    run(
        "cudnnConvolutionBackwardFilter",
        Direction::BackwardFilter,
        found,
        alpha,
        beta,
        algo,
        ptrs,
    )
}
