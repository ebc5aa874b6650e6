//! Communicators made from a unique id (`ncclGetUniqueId`, `ncclCommInitRank`), one rank per
//! thread as one per process would be: each rank's in-place average queued on its own stream
//! over device memory, and every rank's result the mean, bit for bit the same.

mod common;

use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

use mockcuda::driver::{cuStreamSynchronize, SUCCESS as CU_SUCCESS};
use mockcuda::nccl::*;

#[test]
fn ranks_of_one_id_average_device_buffers_on_their_streams() {
    let (ranks, count) = (3usize, 5000usize);
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: a valid output pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, SUCCESS);
    let data: Vec<Vec<f32>> = (0..ranks)
        .map(|r| {
            (0..count)
                .map(|i| ((i * 3 + r * 11) % 17) as f32 / 3.0 - 2.0)
                .collect()
        })
        .collect();
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let mine = &data[rank];
                s.spawn(move || {
                    common::init();
                    let stream = common::non_blocking_stream();
                    let buf = common::alloc_async(count * 4, stream);
                    common::upload(buf, mine, stream);
                    let mut comm = null_mut();
                    // SAFETY: valid pointers; the buffer lives until the download below.
                    unsafe {
                        assert_eq!(
                            ncclCommInitRank(&mut comm, ranks as c_int, id, rank as c_int),
                            SUCCESS
                        );
                        let b = buf as *mut c_void;
                        assert_eq!(ncclAllReduce(b, b, count, 7, 4, comm, stream), SUCCESS);
                        let out = common::download(buf, count, stream);
                        assert_eq!(cuStreamSynchronize(stream), CU_SUCCESS);
                        let mut err = 99u32;
                        assert_eq!(ncclCommGetAsyncError(comm, &mut err), SUCCESS);
                        assert_eq!(err, SUCCESS);
                        assert_eq!(ncclCommDestroy(comm), SUCCESS);
                        out
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for i in 0..count {
        // In rank order, as the mock (and this check) sums.
        let mean = (data[0][i] + data[1][i] + data[2][i]) / 3.0;
        for (r, got) in results.iter().enumerate() {
            assert_eq!(got[i].to_bits(), mean.to_bits(), "rank {r} [{i}]");
        }
    }
}
