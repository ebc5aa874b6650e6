//! A free queued on one stream while another stream's read of the allocation is not ordered
//! before it is a race, reported with both operations.

mod common;

use mockcuda::driver::*;

#[test]
fn a_free_before_a_pending_use_on_another_stream_is_a_race() {
    common::init();
    let a = common::non_blocking_stream();
    let b = common::non_blocking_stream();
    let x = common::alloc_async(256, a);
    assert_eq!(cuStreamSynchronize(a), SUCCESS);
    let _ = common::download(x, 4, b);
    // The host waited for B's read (a pageable download), so this free is ordered.
    let y = common::alloc_async(256, a);
    assert_eq!(cuStreamSynchronize(a), SUCCESS);
    let z = common::alloc_async(256, b);
    // B reads y into z; A frees y without waiting for B.
    assert_eq!(cuMemcpyDtoDAsync_v2(z, y, 256, b), SUCCESS);
    assert_eq!(cuMemFreeAsync(y, a), INVALID_VALUE);
    let e = mockcuda::stream::sticky().expect("sticky");
    assert!(
        e.0.contains("stream race") && e.0.contains("cuMemFreeAsync"),
        "{e}"
    );
    assert!(e.0.contains("cuMemcpyDtoDAsync_v2"), "{e}");
    let _ = x;
}
