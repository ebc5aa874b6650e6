//! cuDNN's legacy descriptors (tensor, filter, convolution), the check of a convolution
//! problem as `cudnnConvolutionForward` and its backward twins document it, and the mock's
//! algorithms with their workspace sizes.

use crate::error::unimplemented;
use crate::libcommon::Elem;

use super::compute::{Geometry, Tensor4};

/// `cudnnStatus_t`.
pub type Status = u32;
pub const SUCCESS: Status = 0;
pub const NOT_INITIALIZED: Status = 1;
pub const BAD_PARAM: Status = 3;
pub const EXECUTION_FAILED: Status = 8;
pub const NOT_SUPPORTED: Status = 9;

pub type Refusal = (Status, String);

// `cudnnDataType_t`.
pub const DATA_FLOAT: u32 = 0;
pub const DATA_BFLOAT16: u32 = 9;
// `cudnnMathType_t`.
pub const DEFAULT_MATH: u32 = 0;
pub const TENSOR_OP_MATH: u32 = 1;
pub const TENSOR_OP_MATH_ALLOW_CONVERSION: u32 = 2;
pub const FMA_MATH: u32 = 3;

/// The element type of a `cudnnDataType_t`: fp32 and bf16 are modelled.
pub fn elem_of(function: &str, t: u32) -> Elem {
    match t {
        DATA_FLOAT => Elem::F32,
        DATA_BFLOAT16 => Elem::Bf16,
        other => unimplemented(
            function,
            &format!("cudnnDataType_t {other} (only FLOAT = 0 and BFLOAT16 = 9 are modelled)"),
        ),
    }
}

/// A tensor or filter descriptor: unset until a `Set` call.
pub type TensorDesc = Option<Tensor4>;

/// Dims and strides of a 4-d descriptor, checked as `cudnnSetTensor4dDescriptorEx` documents:
/// positive dims and strides, at most 2^31 - 1 elements.
pub fn tensor(
    elem: Elem,
    dims: [i32; 4],
    strides: Option<[i32; 4]>,
    nhwc: bool,
) -> Result<Tensor4, Refusal> {
    if dims.iter().any(|&d| d <= 0) {
        return Err((
            BAD_PARAM,
            format!("dims {dims:?}: every one must be positive"),
        ));
    }
    let dims = dims.map(|d| d as usize);
    if dims.iter().product::<usize>() > i32::MAX as usize {
        return Err((
            NOT_SUPPORTED,
            format!("dims {dims:?}: more than 2^31 - 1 elements"),
        ));
    }
    Ok(match strides {
        Some(s) => {
            if s.iter().any(|&v| v <= 0) {
                return Err((
                    BAD_PARAM,
                    format!("strides {s:?}: every one must be positive"),
                ));
            }
            Tensor4 {
                elem,
                dims,
                strides: s.map(|v| v as usize),
            }
        }
        None if nhwc => Tensor4::nhwc(elem, dims),
        None => Tensor4::nchw(elem, dims),
    })
}

/// A convolution descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDesc {
    pub set: bool,
    pub pad: [i32; 2],
    pub stride: [i32; 2],
    pub dilation: [i32; 2],
    pub flip: bool,
    pub compute: u32,
    pub groups: i32,
    pub math: u32,
}

impl Default for ConvDesc {
    fn default() -> Self {
        ConvDesc {
            set: false,
            pad: [0; 2],
            stride: [1; 2],
            dilation: [1; 2],
            flip: false,
            compute: DATA_FLOAT,
            groups: 1,
            math: DEFAULT_MATH,
        }
    }
}

/// `cudnnSetConvolution2dDescriptor`'s checks.
pub fn set_conv(
    d: &mut ConvDesc,
    pad: [i32; 2],
    stride: [i32; 2],
    dilation: [i32; 2],
    mode: u32,
    compute: u32,
) -> Result<(), Refusal> {
    if pad.iter().any(|&p| p < 0)
        || stride.iter().any(|&s| s <= 0)
        || dilation.iter().any(|&v| v <= 0)
    {
        return Err((
            BAD_PARAM,
            format!("padding {pad:?}, stride {stride:?}, dilation {dilation:?}"),
        ));
    }
    if mode > 1 {
        return Err((
            BAD_PARAM,
            format!("mode {mode} is not a cudnnConvolutionMode_t"),
        ));
    }
    *d = ConvDesc {
        set: true,
        pad,
        stride,
        dilation,
        // CUDNN_CONVOLUTION = 0 flips the filter; CUDNN_CROSS_CORRELATION = 1 does not.
        flip: mode == 0,
        compute,
        ..*d
    };
    Ok(())
}

/// One direction's problem, checked: its geometry, the descriptors' layouts, the math.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    pub x: Tensor4,
    pub w: Tensor4,
    pub y: Tensor4,
    pub geometry: Geometry,
    pub math: u32,
}

impl Problem {
    /// fp32 operands read as TF32: fp32 data under a math type that permits tensor cores
    /// (the documentation allows TF32 for DEFAULT_MATH on Ampere and later), unless
    /// `NVIDIA_TF32_OVERRIDE=0` forbids it. `CUDNN_FMA_MATH` never uses it.
    pub fn tf32(&self) -> bool {
        self.x.elem == Elem::F32
            && matches!(
                self.math,
                DEFAULT_MATH | TENSOR_OP_MATH | TENSOR_OP_MATH_ALLOW_CONVERSION
            )
            && std::env::var("NVIDIA_TF32_OVERRIDE").map_or(true, |v| v != "0")
    }
}

/// The output dims of `x` convolved with `w` under `conv`, checked (the rules every direction
/// and `cudnnGetConvolution2dForwardOutputDim` share).
pub fn output_dims(x: &TensorDesc, w: &TensorDesc, conv: &ConvDesc) -> Result<[usize; 4], Refusal> {
    let (Some(x), Some(w)) = (x, w) else {
        return Err((
            BAD_PARAM,
            "a tensor or filter descriptor was never set".into(),
        ));
    };
    if !conv.set {
        return Err((BAD_PARAM, "the convolution descriptor was never set".into()));
    }
    let g = conv.groups as usize;
    let [n, c, h, wd] = x.dims;
    let [k, cg, r, s] = w.dims;
    if cg * g != c || k % g != 0 {
        return Err((
            BAD_PARAM,
            format!("input {c} channels, filter {k}x{cg} per group, {g} groups: they disagree"),
        ));
    }
    let p = Geometry::out_size(
        h,
        r,
        conv.pad[0] as usize,
        conv.stride[0] as usize,
        conv.dilation[0] as usize,
    );
    let q = Geometry::out_size(
        wd,
        s,
        conv.pad[1] as usize,
        conv.stride[1] as usize,
        conv.dilation[1] as usize,
    );
    match (p, q) {
        (Some(p), Some(q)) => Ok([n, k, p, q]),
        _ => Err((
            BAD_PARAM,
            format!("the {r}x{s} filter (dilated) is larger than the padded {h}x{wd} input"),
        )),
    }
}

/// The whole problem of a direction, checked as the documentation lists the rules.
pub fn problem(
    x: &TensorDesc,
    w: &TensorDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
) -> Result<Problem, Refusal> {
    let dims = output_dims(x, w, conv)?;
    let (x, w) = (x.expect("checked"), w.expect("checked"));
    let Some(y) = *y else {
        return Err((BAD_PARAM, "the output descriptor was never set".into()));
    };
    if y.dims != dims {
        return Err((
            BAD_PARAM,
            format!("the output is {:?}, the convolution gives {dims:?}", y.dims),
        ));
    }
    if x.elem != w.elem || x.elem != y.elem {
        return Err((
            BAD_PARAM,
            format!(
                "x {:?}, w {:?}, y {:?}: one data type",
                x.elem, w.elem, y.elem
            ),
        ));
    }
    // The legacy API's configurations: fp32 and bf16 data both compute in fp32.
    if conv.compute != DATA_FLOAT {
        return Err((
            NOT_SUPPORTED,
            format!(
                "compute type {} for {:?} data (only FLOAT)",
                conv.compute, x.elem
            ),
        ));
    }
    Ok(Problem {
        x,
        w,
        y,
        geometry: Geometry {
            x: x.dims,
            w: w.dims,
            y: dims,
            pad: conv.pad.map(|v| v as usize),
            stride: conv.stride.map(|v| v as usize),
            dilation: conv.dilation.map(|v| v as usize),
            groups: conv.groups as usize,
            flip: conv.flip,
        },
        math: conv.math,
    })
}

/// The three directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl Direction {
    /// The size of the direction's algorithm enum (`*_ALGO_COUNT`).
    pub fn algo_count(self) -> usize {
        match self {
            Direction::Forward => 8,
            Direction::BackwardData => 6,
            Direction::BackwardFilter => 7,
        }
    }
}

/// One algorithm of the mock, as a `_v7` query reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgoInfo {
    pub algo: u32,
    pub supported: bool,
    pub deterministic: bool,
    pub workspace: usize,
}

/// The direction's algorithms, best first, then those the mock does not run (reported
/// `NOT_SUPPORTED`, as cuDNN reports algorithms that cannot run a problem). Workspaces are
/// what such an algorithm keeps: an index table, an im2col buffer, an fp32 copy of dW.
/// The backward `ALGO_0` (and filter `ALGO_3`) accumulate in a run-dependent order, as the
/// documentation marks them non-deterministic.
pub fn algorithms(dir: Direction, p: &Problem) -> Vec<AlgoInfo> {
    let [_, _, r, s] = p.geometry.w;
    let [_, _, oh, ow] = p.geometry.y;
    let cg = p.geometry.w[1];
    let e = p.x.elem.size();
    let a = |algo, deterministic, workspace| AlgoInfo {
        algo,
        supported: true,
        deterministic,
        workspace,
    };
    let mut list = match dir {
        // IMPLICIT_PRECOMP_GEMM (1), IMPLICIT_GEMM (0), GEMM (2).
        Direction::Forward => vec![
            a(1, true, cg * r * s * 4),
            a(0, true, 0),
            a(2, true, cg * r * s * oh * ow * e),
        ],
        // ALGO_0 (atomics), ALGO_1.
        Direction::BackwardData => vec![a(0, false, 0), a(1, true, 0)],
        // ALGO_0 (atomics), ALGO_1 (fp32 dW), ALGO_3 (atomics).
        Direction::BackwardFilter => vec![
            a(0, false, 0),
            a(1, true, p.geometry.w.iter().product::<usize>() * 4),
            a(3, false, 0),
        ],
    };
    for algo in 0..dir.algo_count() as u32 {
        if !list.iter().any(|i| i.algo == algo) {
            list.push(AlgoInfo {
                algo,
                supported: false,
                deterministic: true,
                workspace: 0,
            });
        }
    }
    list
}

/// The algorithm `algo` of `dir` for `p`, when the mock runs it.
pub fn algorithm(dir: Direction, p: &Problem, algo: u32) -> Result<AlgoInfo, Refusal> {
    algorithms(dir, p)
        .into_iter()
        .find(|i| i.algo == algo && i.supported)
        .ok_or_else(|| {
            (
                NOT_SUPPORTED,
                format!("{dir:?} algorithm {algo} is not supported for this problem"),
            )
        })
}
