//! Setup shared by the mock's tests: the driver initialised, the primary context current, and
//! faults made sticky errors (so a test can look at them instead of the process aborting).

#![allow(dead_code)] // each test file uses a part of it

use std::ffi::c_void;

use mockcuda::driver::*;

pub fn init() {
    mockcuda::stream::set_abort_on_fault(false);
    assert_eq!(cuInit(0), SUCCESS);
    let mut ctx = std::ptr::null_mut();
    // SAFETY: valid output pointer.
    assert_eq!(unsafe { cuDevicePrimaryCtxRetain(&mut ctx, 0) }, SUCCESS);
    assert_eq!(cuCtxSetCurrent(ctx), SUCCESS);
}

pub fn non_blocking_stream() -> *mut c_void {
    let mut s = std::ptr::null_mut();
    // SAFETY: valid output pointer.
    assert_eq!(unsafe { cuStreamCreate(&mut s, 1) }, SUCCESS);
    s
}

pub fn alloc_async(bytes: usize, s: *mut c_void) -> u64 {
    let mut p = 0u64;
    // SAFETY: valid output pointer.
    assert_eq!(unsafe { cuMemAllocAsync(&mut p, bytes, s) }, SUCCESS);
    p
}

pub fn event() -> *mut c_void {
    let mut e = std::ptr::null_mut();
    // SAFETY: valid output pointer.
    assert_eq!(unsafe { cuEventCreate(&mut e, 0) }, SUCCESS);
    e
}

pub fn upload(dst: u64, data: &[f32], s: *mut c_void) {
    // SAFETY: data outlives the call (a pageable source is copied before it returns).
    let rc =
        unsafe { cuMemcpyHtoDAsync_v2(dst, data.as_ptr() as *const c_void, data.len() * 4, s) };
    assert_eq!(rc, SUCCESS);
}

pub fn download(src: u64, n: usize, s: *mut c_void) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // SAFETY: a pageable destination: the call waits for the copy.
    let rc = unsafe { cuMemcpyDtoHAsync_v2(out.as_mut_ptr() as *mut c_void, src, n * 4, s) };
    assert_eq!(rc, SUCCESS);
    out
}
