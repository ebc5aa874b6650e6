//! A write past the end of an allocation is found when it is freed, naming the allocation and
//! the last operations that wrote it.

mod common;

use mockcuda::driver::*;

#[test]
fn an_overrun_is_caught_at_free() {
    common::init();
    let s = common::non_blocking_stream();
    let p = common::alloc_async(1000, s);
    common::upload(p, &[2.0; 250], s);
    assert_eq!(cuStreamSynchronize(s), SUCCESS);
    // What a kernel writing one element too many does, through the kernel view.
    let host = mockcuda::memory::host_range(p, 1000, "test").unwrap();
    // SAFETY: inside the allocation's guard span (mapped, owned by the mock).
    unsafe { host.add(1000).write(7) };
    assert_eq!(cuMemFreeAsync(p, s), SUCCESS);
    assert_eq!(cuStreamSynchronize(s), LAUNCH_FAILED);
    let e = mockcuda::stream::sticky().expect("sticky");
    assert!(e.0.contains("a write outside device allocation"), "{e}");
    assert!(
        e.0.contains("1000 bytes") && e.0.contains("byte 1000"),
        "{e}"
    );
    assert!(
        e.0.contains("cuMemcpyHtoDAsync_v2"),
        "names the last writer: {e}"
    );
}
