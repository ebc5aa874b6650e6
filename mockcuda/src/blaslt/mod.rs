//! The mock cuBLASLt (`libcublasLt.so.13`): handles, matmul descriptors, matrix layouts,
//! preferences, the heuristic query and `cublasLtMatmul`, with the documented statuses.
//!
//! - `desc`: the descriptors' state, their attributes and the check of a problem;
//! - `compute`: the product itself on host bytes;
//! - here: the exported entry points, which check, resolve device pointers and queue the
//!   product on the caller's stream with the byte ranges it reads and writes.
//!
//! The mock's one algorithm requires of each operand the alignment the preference promised
//! (256 bytes by default) and asks for a workspace (an fp32 copy of D, at most 4 MiB) whenever
//! the preference allows it, so a misaligned operand or a too-small workspace fails at the
//! call as on a GPU. Attributes, types and modes it does not model stop the process naming
//! them (`error::unimplemented`).

// The entry points' contracts are NVIDIA's documentation of the C API.
#![allow(clippy::missing_safety_doc)]

pub mod compute;
pub mod desc;
#[cfg(test)]
mod tests;

use std::ffi::{c_char, c_int, c_void};

use crate::libcommon::{explain, HostRange, Registry};
use crate::stream::{enqueue, Access};

use desc::{
    Layout, MatmulDesc, Pref, Problem, Refusal, Status, EXECUTION_FAILED, INVALID_VALUE,
    NOT_INITIALIZED, NOT_SUPPORTED, SUCCESS,
};

static HANDLES: Registry<()> = Registry::new();
static DESCS: Registry<MatmulDesc> = Registry::new();
static LAYOUTS: Registry<Layout> = Registry::new();
static PREFS: Registry<Pref> = Registry::new();

/// The version reported: cuBLAS 13.0.0 (`major * 10000 + minor * 100 + patch`).
pub const VERSION: usize = 13_00_00;

/// `cublasLtMatmulAlgo_t`: opaque to the caller; the mock keeps what its algorithm needs.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algo {
    pub data: [u64; 8],
}

/// Marks an algorithm the mock's heuristic returned.
const ALGO_MAGIC: u64 = 0x6d6f_636b_6c74_0001;

impl Algo {
    fn new(align: [u32; 4], workspace: usize) -> Algo {
        let mut data = [0u64; 8];
        data[0] = ALGO_MAGIC;
        for (i, a) in align.iter().enumerate() {
            data[1 + i] = *a as u64;
        }
        data[5] = workspace as u64;
        Algo { data }
    }

    fn align(&self) -> [u32; 4] {
        std::array::from_fn(|i| self.data[1 + i] as u32)
    }

    fn workspace(&self) -> usize {
        self.data[5] as usize
    }
}

/// `cublasLtMatmulHeuristicResult_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HeuristicResult {
    pub algo: Algo,
    pub workspace_size: usize,
    pub state: Status,
    pub waves_count: f32,
    pub reserved: [c_int; 4],
}

// The C layout of cublasLt.h: a 64-byte algorithm, size_t, enum, float, int[4].
const _: () = assert!(std::mem::size_of::<HeuristicResult>() == 96);

fn refuse(function: &str, (status, msg): Refusal) -> Status {
    explain("cuBLASLt", function, &msg);
    status
}

/// Reads `size` bytes at `buf` as an attribute value (an empty slice for a null `buf`, which
/// the size check then refuses).
unsafe fn attr_bytes<'a>(buf: *const c_void, size: usize) -> &'a [u8] {
    if buf.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(buf as *const u8, size)
    }
}

/// Writes a new handle through `out` (`INVALID_VALUE` for a null `out`).
unsafe fn make<T: Clone>(reg: &Registry<T>, out: *mut *mut c_void, v: T) -> Status {
    if out.is_null() {
        return INVALID_VALUE;
    }
    *out = reg.insert(v);
    SUCCESS
}

fn destroy<T: Clone>(reg: &Registry<T>, h: *mut c_void, function: &str) -> Status {
    // Destroying null is allowed and does nothing; an unknown handle is refused.
    if h.is_null() || reg.remove(h).is_some() {
        SUCCESS
    } else {
        refuse(
            function,
            (INVALID_VALUE, format!("{h:?} is not a live object")),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(handle: *mut *mut c_void) -> Status {
    make(&HANDLES, handle, ())
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(handle: *mut c_void) -> Status {
    if HANDLES.remove(handle).is_some() {
        SUCCESS
    } else {
        NOT_INITIALIZED
    }
}

#[no_mangle]
pub extern "C" fn cublasLtGetVersion() -> usize {
    VERSION
}

#[no_mangle]
pub extern "C" fn cublasLtGetStatusName(status: Status) -> *const c_char {
    status_name(status).as_ptr() as *const c_char
}

#[no_mangle]
pub extern "C" fn cublasLtGetStatusString(status: Status) -> *const c_char {
    status_name(status).as_ptr() as *const c_char
}

/// The name of a status, NUL-terminated.
pub fn status_name(status: Status) -> &'static str {
    match status {
        SUCCESS => "CUBLAS_STATUS_SUCCESS\0",
        NOT_INITIALIZED => "CUBLAS_STATUS_NOT_INITIALIZED\0",
        INVALID_VALUE => "CUBLAS_STATUS_INVALID_VALUE\0",
        EXECUTION_FAILED => "CUBLAS_STATUS_EXECUTION_FAILED\0",
        NOT_SUPPORTED => "CUBLAS_STATUS_NOT_SUPPORTED\0",
        _ => "CUBLAS_STATUS_UNKNOWN\0",
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    layout: *mut *mut c_void,
    data_type: u32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> Status {
    let elem = desc::elem_of("cublasLtMatrixLayoutCreate", data_type as i64);
    make(&LAYOUTS, layout, desc::layout(elem, rows, cols, ld))
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(layout: *mut c_void) -> Status {
    destroy(&LAYOUTS, layout, "cublasLtMatrixLayoutDestroy")
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(
    layout: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> Status {
    const F: &str = "cublasLtMatrixLayoutSetAttribute";
    let bytes = attr_bytes(buf, size);
    match LAYOUTS.update(layout, |l| desc::set_layout_attribute(l, attr, bytes)) {
        None => refuse(
            F,
            (INVALID_VALUE, format!("{layout:?} is not a live layout")),
        ),
        Some(Err(r)) => refuse(F, r),
        Some(Ok(())) => SUCCESS,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    desc: *mut *mut c_void,
    compute_type: u32,
    scale_type: u32,
) -> Status {
    let d = MatmulDesc::new(
        "cublasLtMatmulDescCreate",
        compute_type as i32,
        scale_type as i64,
    );
    make(&DESCS, desc, d)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(desc: *mut c_void) -> Status {
    destroy(&DESCS, desc, "cublasLtMatmulDescDestroy")
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    desc: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> Status {
    const F: &str = "cublasLtMatmulDescSetAttribute";
    let bytes = attr_bytes(buf, size);
    match DESCS.update(desc, |d| desc::set_desc_attribute(d, attr, bytes)) {
        None => refuse(
            F,
            (
                INVALID_VALUE,
                format!("{desc:?} is not a live matmul descriptor"),
            ),
        ),
        Some(Err(r)) => refuse(F, r),
        Some(Ok(())) => SUCCESS,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut *mut c_void) -> Status {
    make(&PREFS, pref, Pref::default())
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceDestroy(pref: *mut c_void) -> Status {
    destroy(&PREFS, pref, "cublasLtMatmulPreferenceDestroy")
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    pref: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> Status {
    const F: &str = "cublasLtMatmulPreferenceSetAttribute";
    let bytes = attr_bytes(buf, size);
    match PREFS.update(pref, |p| desc::set_pref_attribute(p, attr, bytes)) {
        None => refuse(
            F,
            (INVALID_VALUE, format!("{pref:?} is not a live preference")),
        ),
        Some(Err(r)) => refuse(F, r),
        Some(Ok(())) => SUCCESS,
    }
}

/// The problem the handles name, checked.
fn lookup(
    handle: *mut c_void,
    desc: *mut c_void,
    layouts: [*mut c_void; 4],
) -> Result<(MatmulDesc, Problem), Refusal> {
    if HANDLES.get(handle).is_none() {
        return Err((
            NOT_INITIALIZED,
            format!("{handle:?} is not a live cuBLASLt handle"),
        ));
    }
    let d = DESCS.get(desc).ok_or_else(|| {
        (
            INVALID_VALUE,
            format!("{desc:?} is not a live matmul descriptor"),
        )
    })?;
    let mut ls = [desc::layout(crate::libcommon::Elem::F32, 0, 0, 0); 4];
    for (i, (l, name)) in layouts.iter().zip(["A", "B", "C", "D"]).enumerate() {
        ls[i] = LAYOUTS.get(*l).ok_or_else(|| {
            (
                INVALID_VALUE,
                format!("{name}'s layout {l:?} is not a live layout"),
            )
        })?;
    }
    let p = desc::problem(&d, &ls[0], &ls[1], &ls[2], &ls[3])?;
    Ok((d, p))
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    handle: *mut c_void,
    desc: *mut c_void,
    a: *mut c_void,
    b: *mut c_void,
    c: *mut c_void,
    d: *mut c_void,
    pref: *mut c_void,
    requested: c_int,
    results: *mut HeuristicResult,
    returned: *mut c_int,
) -> Status {
    const F: &str = "cublasLtMatmulAlgoGetHeuristic";
    if requested <= 0 || results.is_null() || returned.is_null() {
        return refuse(
            F,
            (
                INVALID_VALUE,
                format!("requestedAlgoCount {requested}, or a null output"),
            ),
        );
    }
    let (_, problem) = match lookup(handle, desc, [a, b, c, d]) {
        Ok(v) => v,
        Err(r) => return refuse(F, r),
    };
    let Some(pref) = PREFS.get(pref) else {
        return refuse(
            F,
            (INVALID_VALUE, format!("{pref:?} is not a live preference")),
        );
    };
    let workspace = desc::workspace_wanted(&problem, &pref);
    *results = HeuristicResult {
        algo: Algo::new(desc::alignments(&problem, &pref), workspace),
        workspace_size: workspace,
        state: SUCCESS,
        waves_count: 1.0,
        reserved: [0; 4],
    };
    *returned = 1;
    SUCCESS
}

/// A host scalar (pointer mode host).
unsafe fn scalar(p: *const c_void) -> Option<f32> {
    (!p.is_null()).then(|| *(p as *const f32))
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmul(
    handle: *mut c_void,
    desc: *mut c_void,
    alpha: *const c_void,
    a: *const c_void,
    a_desc: *mut c_void,
    b: *const c_void,
    b_desc: *mut c_void,
    beta: *const c_void,
    c: *const c_void,
    c_desc: *mut c_void,
    d: *mut c_void,
    d_desc: *mut c_void,
    algo: *const Algo,
    workspace: *mut c_void,
    workspace_size: usize,
    stream: *mut c_void,
) -> Status {
    const F: &str = "cublasLtMatmul";
    let (md, mut problem) = match lookup(handle, desc, [a_desc, b_desc, c_desc, d_desc]) {
        Ok(v) => v,
        Err(r) => return refuse(F, r),
    };
    let (Some(alpha), Some(beta)) = (scalar(alpha), scalar(beta)) else {
        return refuse(F, (INVALID_VALUE, "alpha or beta is null".into()));
    };
    problem.product.alpha = alpha;
    problem.product.beta = beta;
    // A null algorithm: the heuristic runs inside the call, with the workspace given and no
    // alignment promised beyond one element.
    let algo = if algo.is_null() {
        let pref = Pref {
            max_workspace: workspace_size as u64,
            align: [1; 4],
        };
        Algo::new(
            desc::alignments(&problem, &pref),
            desc::workspace_wanted(&problem, &pref),
        )
    } else {
        *algo
    };
    let ptrs = [a as u64, b as u64, c as u64, d as u64];
    match check_call(&md, &problem, &algo, ptrs, workspace as u64, workspace_size) {
        Ok(()) => {}
        Err(r) => return refuse(F, r),
    }
    match queue(&md, &problem, &algo, ptrs, workspace as u64, stream) {
        Ok(()) => SUCCESS,
        Err(msg) => refuse(F, (EXECUTION_FAILED, msg)),
    }
}

/// The rules of one call beyond the descriptors: the algorithm, its alignments and workspace,
/// the in-place rule, the bias pointer.
pub fn check_call(
    md: &MatmulDesc,
    p: &Problem,
    algo: &Algo,
    ptrs: [u64; 4],
    workspace: u64,
    workspace_size: usize,
) -> Result<(), Refusal> {
    if algo.data[0] != ALGO_MAGIC {
        return Err((
            INVALID_VALUE,
            "the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic".into(),
        ));
    }
    if workspace_size < algo.workspace() {
        return Err((
            INVALID_VALUE,
            format!(
                "the algorithm needs {} bytes of workspace, {workspace_size} were given",
                algo.workspace()
            ),
        ));
    }
    if workspace == 0 && algo.workspace() > 0 {
        return Err((INVALID_VALUE, "the workspace is null".into()));
    }
    for ((name, ptr), align) in ["A", "B", "C", "D"].iter().zip(ptrs).zip(algo.align()) {
        let skip_c = *name == "C" && p.product.beta == 0.0;
        if !skip_c && ptr % align as u64 != 0 {
            return Err((
                NOT_SUPPORTED,
                format!("{name} at {ptr:#x} is not aligned to the {align} bytes the algorithm was chosen for"),
            ));
        }
        if ptr == 0 && !skip_c && p.d.span_bytes() > 0 {
            return Err((INVALID_VALUE, format!("{name} is null")));
        }
    }
    if ptrs[2] == ptrs[3] && p.product.beta != 0.0 && p.c != p.d {
        return Err((
            INVALID_VALUE,
            "in place (C == D) needs one layout for C and D".into(),
        ));
    }
    if p.product.bias.is_some() && md.bias_pointer == 0 {
        return Err((
            INVALID_VALUE,
            "the BIAS epilogue has no bias pointer".into(),
        ));
    }
    Ok(())
}

/// Resolves the operands and queues the product on `stream`.
fn queue(
    md: &MatmulDesc,
    p: &Problem,
    algo: &Algo,
    [a, b, c, d]: [u64; 4],
    workspace: u64,
    stream: *mut c_void,
) -> Result<(), String> {
    let err = |e: crate::error::MockError| e.0;
    let read_c = p.product.beta != 0.0;
    let ar = HostRange::resolve(a, p.a.span_bytes(), "cublasLtMatmul A").map_err(err)?;
    let br = HostRange::resolve(b, p.b.span_bytes(), "cublasLtMatmul B").map_err(err)?;
    let cr = if read_c {
        HostRange::resolve(c, p.c.span_bytes(), "cublasLtMatmul C").map_err(err)?
    } else {
        HostRange { addr: 0, len: 0 }
    };
    let dr = HostRange::resolve(d, p.d.span_bytes(), "cublasLtMatmul D").map_err(err)?;
    let bias_len = compute::bias_span_bytes(&p.product);
    let bias = md.bias_pointer;
    let biasr = HostRange::resolve(bias, bias_len, "cublasLtMatmul bias").map_err(err)?;
    let ws_len = algo.workspace();
    HostRange::resolve(workspace, ws_len, "cublasLtMatmul workspace").map_err(err)?;
    let mut accesses = vec![Access::Read(a, ar.len), Access::Read(b, br.len)];
    if read_c {
        accesses.push(Access::Read(c, cr.len));
    }
    if bias_len > 0 {
        accesses.push(Access::Read(bias, bias_len));
    }
    accesses.push(Access::Write(d, dr.len));
    if ws_len > 0 {
        // The algorithm's scratch: two products sharing one workspace on two streams race.
        accesses.push(Access::Write(workspace, ws_len));
    }
    let p = *p;
    let name = format!(
        "cublasLtMatmul {}x{}x{} batch {} ({:?} -> {:?})",
        p.product.m, p.product.n, p.product.k, p.product.batch, p.a.elem, p.d.elem
    );
    enqueue(
        stream,
        name,
        accesses,
        Box::new(move || {
            // SAFETY: each range was resolved inside a live allocation when queued, and the
            // race detector orders this work after the writes it reads and before any free.
            // The inputs are read (and their views dropped) before D is written: C and D may
            // be one buffer.
            let values = unsafe {
                compute::product(
                    &p.product,
                    (&p.a, ar.bytes()),
                    (&p.b, br.bytes()),
                    (&p.c, cr.bytes()),
                    biasr.bytes(),
                )
            };
            compute::store(&p.d, &values, unsafe { dr.bytes_mut() });
            Ok(())
        }),
    )
    .map_err(err)
}
