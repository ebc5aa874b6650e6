//! Streams, events and the detector on correct programs: an event recorded and waited for
//! orders two streams, host synchronisation orders everything before it, the data arrive, and
//! no race is reported. Also: a free before a pending use on another stream is a race.

mod common;

use std::ffi::c_void;

use mockcuda::driver::*;

#[test]
fn ordered_streams_pass_and_see_each_others_writes() {
    common::init();
    let a = common::non_blocking_stream();
    let b = common::non_blocking_stream();
    let x = common::alloc_async(4096, a);
    let y = common::alloc_async(4096, a);
    let data: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    common::upload(x, &data, a);
    let ev = common::event();
    // SAFETY: live handles.
    unsafe {
        assert_eq!(cuEventRecord(ev, a), SUCCESS);
        assert_eq!(cuStreamWaitEvent(b, ev, 0), SUCCESS);
    }
    // B reads x and writes y, both made and written on A before the event.
    assert_eq!(cuMemcpyDtoDAsync_v2(y, x, 4096, b), SUCCESS);
    assert_eq!(common::download(y, 1024, b), data);
    // A reads y after the host waited for B (the download above synchronised B).
    assert_eq!(common::download(y, 4, a), &data[..4]);
    // Timing events measure something non-negative.
    let (t0, t1) = (common::event(), common::event());
    let mut ms = -1f32;
    // SAFETY: live handles, valid output pointer.
    unsafe {
        assert_eq!(cuEventRecord(t0, a), SUCCESS);
        assert_eq!(cuMemsetD8Async(x, 0, 4096, a), SUCCESS);
        assert_eq!(cuEventRecord(t1, a), SUCCESS);
        assert_eq!(cuEventSynchronize(t1), SUCCESS);
        assert_eq!(cuEventQuery(t1), SUCCESS);
        assert_eq!(cuEventElapsedTime(&mut ms, t0, t1), SUCCESS);
    }
    assert!(ms >= 0.0, "{ms}");
    assert_eq!(common::download(x, 2, a), [0.0, 0.0]);
    assert_eq!(cuMemFreeAsync(x, a), SUCCESS);
    // A second free of the same allocation is refused (not a race: the free is known).
    assert_eq!(cuMemFreeAsync(x, a), INVALID_VALUE);
    // A use after a queued free is refused.
    assert_eq!(cuMemcpyDtoDAsync_v2(y, x, 16, a), INVALID_VALUE);
    // y was last used on A and B; the host synchronised both.
    assert_eq!(cuCtxSynchronize(), SUCCESS);
    assert_eq!(cuMemFreeAsync(y, b), SUCCESS);
    assert_eq!(cuCtxSynchronize(), SUCCESS);
    assert!(mockcuda::stream::sticky().is_none());
}

#[test]
fn device_pointers_fault_on_the_host_and_host_pointers_are_refused() {
    common::init();
    let s = common::non_blocking_stream();
    let p = common::alloc_async(100, s);
    assert_eq!(p % 256, 0, "256-byte aligned, as cuMemAlloc");
    assert!(mockcuda::memory::in_device_range(p));
    // A host address given as a device pointer.
    let host = [0u8; 64];
    let e = mockcuda::memory::host_range(host.as_ptr() as u64, 64, "test").unwrap_err();
    assert!(e.0.contains("not a device address"), "{e}");
    // A range past the allocation's end.
    let e = mockcuda::memory::host_range(p + 64, 64, "test").unwrap_err();
    assert!(e.0.contains("run past the end"), "{e}");
    // A copy from a device pointer given as the host source.
    // SAFETY: the mock refuses the call before reading anything.
    let rc = unsafe { cuMemcpyHtoDAsync_v2(p, p as *const c_void, 4, s) };
    assert_eq!(rc, INVALID_VALUE);
    // The device view itself is not readable from the host.
    let mut prot_none = false;
    for line in std::fs::read_to_string("/proc/self/maps").unwrap().lines() {
        let range = line.split_whitespace().next().unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        if lo <= p && p < hi {
            prot_none = line.split_whitespace().nth(1).unwrap().starts_with("---");
        }
    }
    assert!(prot_none, "the device view must be mapped without access");
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid output pointers.
    assert_eq!(unsafe { cuMemGetInfo_v2(&mut free, &mut total) }, SUCCESS);
    assert!(free < total && total as u64 == mockcuda::memory::DEVICE_BYTES);
    assert_eq!(cuMemFreeAsync(p, s), SUCCESS);
    assert_eq!(cuStreamSynchronize(s), SUCCESS);
}
