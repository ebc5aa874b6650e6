//! The race detector sees a library's workspace: two products on two streams sharing one
//! cuBLASLt workspace with nothing ordering them (what the engine's per-stream workspaces
//! exist to prevent) are reported, naming both calls.

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use mockcuda::blaslt::desc::{EXECUTION_FAILED, SUCCESS};
use mockcuda::blaslt::*;
use mockcuda::driver::cuCtxSynchronize;

#[test]
fn two_streams_sharing_a_workspace_race() {
    common::init();
    let (sa, sb) = (common::non_blocking_stream(), common::non_blocking_stream());
    let n = 8u64;
    let bytes = (n * n * 4) as usize;
    let a = common::alloc_async(bytes, sa);
    let d1 = common::alloc_async(bytes, sa);
    let d2 = common::alloc_async(bytes, sa);
    common::upload(a, &vec![0.5; (n * n) as usize], sa);
    unsafe {
        let (mut h, mut desc, mut l, mut pref) = (null_mut(), null_mut(), null_mut(), null_mut());
        assert_eq!(cublasLtCreate(&mut h), SUCCESS);
        assert_eq!(cublasLtMatmulDescCreate(&mut desc, 68, 0), SUCCESS);
        assert_eq!(
            cublasLtMatrixLayoutCreate(&mut l, 0, n, n, n as i64),
            SUCCESS
        );
        assert_eq!(cublasLtMatmulPreferenceCreate(&mut pref), SUCCESS);
        let max = (1u64 << 20).to_le_bytes();
        assert_eq!(
            cublasLtMatmulPreferenceSetAttribute(pref, 1, max.as_ptr() as *const c_void, 8),
            SUCCESS
        );
        let mut r: HeuristicResult = std::mem::zeroed();
        let mut count = 0;
        assert_eq!(
            cublasLtMatmulAlgoGetHeuristic(h, desc, l, l, l, l, pref, 1, &mut r, &mut count),
            SUCCESS
        );
        assert!(
            r.workspace_size > 0,
            "the mock's algorithm wants a workspace here"
        );
        let ws = common::alloc_async(r.workspace_size, sa);
        // Everything above is finished and visible to both streams.
        assert_eq!(cuCtxSynchronize(), mockcuda::driver::SUCCESS);
        let (alpha, beta) = (1f32, 0f32);
        let run = |d: u64, s: *mut c_void| {
            cublasLtMatmul(
                h,
                desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                l,
                a as *const c_void,
                l,
                &beta as *const f32 as *const c_void,
                d as *const c_void,
                l,
                d as *mut c_void,
                l,
                &r.algo,
                ws as *mut c_void,
                r.workspace_size,
                s,
            )
        };
        assert_eq!(run(d1, sa), SUCCESS);
        // Stream B writes the same workspace while A's product may still be using it.
        assert_eq!(run(d2, sb), EXECUTION_FAILED);
    }
    let e = mockcuda::stream::sticky().expect("the race must be sticky");
    assert!(e.0.contains("stream race"), "{e}");
    assert!(
        e.0.matches("cublasLtMatmul").count() >= 2,
        "names both products: {e}"
    );
}
