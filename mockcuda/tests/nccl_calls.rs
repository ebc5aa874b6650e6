//! NCCL through its entry points on device memory: two communicators of one process, one
//! group of in-place averages on two streams (as the engine's AllReduceGroup queues them),
//! then a sum, each rank's buffer checked against the definition.

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use mockcuda::driver::cuCtxSynchronize;
use mockcuda::nccl::*;

#[test]
fn a_group_of_in_place_averages_on_two_streams() {
    common::init();
    let count = 300;
    let streams = [common::non_blocking_stream(), common::non_blocking_stream()];
    let data: Vec<Vec<f32>> = (0..2)
        .map(|r| {
            (0..count)
                .map(|i| (i * (r + 1)) as f32 / 8.0 - r as f32)
                .collect()
        })
        .collect();
    let bufs: Vec<u64> = (0..2)
        .map(|r| common::alloc_async(count * 4, streams[r]))
        .collect();
    let sums: Vec<u64> = (0..2)
        .map(|r| common::alloc_async(count * 4, streams[r]))
        .collect();
    for r in 0..2 {
        common::upload(bufs[r], &data[r], streams[r]);
    }
    unsafe {
        let mut comms = [null_mut::<c_void>(); 2];
        assert_eq!(
            ncclCommInitAll(comms.as_mut_ptr(), 2, [0, 1].as_ptr()),
            SUCCESS
        );
        assert_eq!(ncclGroupStart(), SUCCESS);
        for r in 0..2 {
            let b = bufs[r] as *mut c_void;
            assert_eq!(
                ncclAllReduce(b, b, count, 7, 4, comms[r], streams[r]),
                SUCCESS
            );
        }
        assert_eq!(ncclGroupEnd(), SUCCESS);
        // Outside a group each rank's call is queued at once; the ranks still meet.
        for r in 0..2 {
            assert_eq!(
                ncclAllReduce(
                    bufs[r] as *mut c_void,
                    sums[r] as *mut c_void,
                    count,
                    7,
                    0,
                    comms[r],
                    streams[r]
                ),
                SUCCESS
            );
        }
        for r in 0..2 {
            let mean = common::download(bufs[r], count, streams[r]);
            let sum = common::download(sums[r], count, streams[r]);
            for i in 0..count {
                let m = (data[0][i] + data[1][i]) / 2.0;
                assert_eq!(mean[i], m, "rank {r} mean [{i}]");
                assert_eq!(sum[i], 2.0 * m, "rank {r} sum [{i}]");
            }
        }
        for c in comms {
            assert_eq!(ncclCommDestroy(c), SUCCESS);
        }
    }
    assert_eq!(cuCtxSynchronize(), mockcuda::driver::SUCCESS);
}
