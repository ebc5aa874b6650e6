//! A peer that leaves (`ncclCommAbort`, as a process that exits): the other rank's queued
//! all-reduce fails on its stream at once, and `ncclCommGetAsyncError` reports
//! `ncclRemoteError`. In its own test binary: the failure is sticky for the process.

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use mockcuda::driver::{cuStreamSynchronize, SUCCESS as CU_SUCCESS};
use mockcuda::nccl::*;

#[test]
fn a_peer_that_aborts_fails_the_others_collective() {
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: a valid output pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, SUCCESS);
    // Rank 1 joins on its own thread, then aborts its communicator.
    let peer = std::thread::spawn(move || {
        let mut comm = null_mut();
        // SAFETY: a valid output pointer.
        unsafe {
            assert_eq!(ncclCommInitRank(&mut comm, 2, id, 1), SUCCESS);
            assert_eq!(ncclCommAbort(comm), SUCCESS);
        }
    });
    common::init();
    let stream = common::non_blocking_stream();
    let buf = common::alloc_async(64 * 4, stream);
    common::upload(buf, &[1.0; 64], stream);
    let mut comm = null_mut();
    // SAFETY: valid pointers; the buffer outlives the stream's work.
    unsafe {
        assert_eq!(ncclCommInitRank(&mut comm, 2, id, 0), SUCCESS);
        peer.join().unwrap();
        let start = Instant::now();
        let b = buf as *mut c_void;
        // Queued: the failure is the stream's, as a GPU's collective would be.
        assert_eq!(ncclAllReduce(b, b, 64, 7, 4, comm, stream), SUCCESS);
        assert_ne!(cuStreamSynchronize(stream), CU_SUCCESS);
        assert!(start.elapsed() < Duration::from_secs(10), "noticed at once");
        let mut err = 0u32;
        assert_eq!(ncclCommGetAsyncError(comm, &mut err), SUCCESS);
        assert_eq!(err, REMOTE_ERROR);
        assert_eq!(ncclCommAbort(comm), SUCCESS);
    }
}
