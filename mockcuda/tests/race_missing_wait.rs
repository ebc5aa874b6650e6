//! The race detector finds a missing wait: stream B reads a buffer stream A writes, with no
//! event between them; the report names both operations, their streams and the buffer, and
//! the error is sticky.

mod common;

use mockcuda::driver::*;

#[test]
fn a_read_on_another_stream_without_a_wait_is_a_race() {
    common::init();
    let a = common::non_blocking_stream();
    let b = common::non_blocking_stream();
    let buf = common::alloc_async(1024, a);
    let other = common::alloc_async(1024, b);
    // Ordered: the host waits for both allocations before using them elsewhere.
    assert_eq!(cuCtxSynchronize(), SUCCESS);
    common::upload(buf, &[1.0; 256], a);
    // B copies from `buf` while A may still be writing it: nothing orders the two.
    let rc = cuMemcpyDtoDAsync_v2(other, buf, 1024, b);
    assert_eq!(rc, INVALID_VALUE, "the unordered read must be refused");
    let e = mockcuda::stream::sticky().expect("the race must be sticky");
    assert!(e.0.contains("stream race"), "{e}");
    assert!(
        e.0.contains("cuMemcpyDtoDAsync_v2"),
        "names the second operation: {e}"
    );
    assert!(
        e.0.contains("cuMemcpyHtoDAsync_v2"),
        "names the first operation: {e}"
    );
    assert!(e.0.contains(&format!("{buf:#x}")), "names the buffer: {e}");
    assert!(
        e.0.contains(&format!("{a:?}")) && e.0.contains(&format!("{b:?}")),
        "names both streams: {e}"
    );
    // Every later call fails, as after a failed kernel.
    assert_eq!(cuCtxSynchronize(), LAUNCH_FAILED);
    assert_eq!(cuMemFreeAsync(buf, a), LAUNCH_FAILED);
}
