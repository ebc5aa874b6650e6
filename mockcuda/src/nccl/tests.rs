//! NCCL's all-reduce against plain loops, the meeting of ranks on their own threads (as their
//! streams' workers), and the entry points' documented results.

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::time::Duration;

use super::collective::{reduce, Clique, Part, RedOp};
use super::*;
use crate::libcommon::{Elem, HostRange};

fn bytes_of(elem: Elem, vals: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; vals.len() * elem.size()];
    for (i, v) in vals.iter().enumerate() {
        elem.store(&mut b, i, *v);
    }
    b
}

fn rank_values(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((i * 7 + rank * 5) % 11) as f32 / 4.0 - 1.0)
        .collect()
}

#[test]
fn reductions_follow_the_definitions() {
    let (ranks, count) = (3, 10);
    for elem in [Elem::F32, Elem::Bf16] {
        let inputs: Vec<Vec<u8>> = (0..ranks)
            .map(|r| bytes_of(elem, &rank_values(r, count)))
            .collect();
        let views: Vec<&[u8]> = inputs.iter().map(|b| b.as_slice()).collect();
        for op in [RedOp::Sum, RedOp::Prod, RedOp::Max, RedOp::Min, RedOp::Avg] {
            let got = reduce(op, elem, &views, count);
            for (i, g) in got.iter().enumerate() {
                let vals: Vec<f64> = (0..ranks)
                    .map(|r| elem.load(&inputs[r], i) as f64)
                    .collect();
                let want = match op {
                    RedOp::Sum => vals.iter().sum(),
                    RedOp::Prod => vals.iter().product(),
                    RedOp::Max => vals.iter().cloned().fold(f64::MIN, f64::max),
                    RedOp::Min => vals.iter().cloned().fold(f64::MAX, f64::min),
                    RedOp::Avg => vals.iter().sum::<f64>() / ranks as f64,
                };
                assert!(
                    (*g as f64 - want).abs() < 1e-6,
                    "{op:?} {elem:?} [{i}] = {g}, want {want}"
                );
            }
        }
    }
}

fn range(b: &mut [u8]) -> HostRange {
    HostRange {
        addr: b.as_mut_ptr() as usize,
        len: b.len(),
    }
}

#[test]
fn ranks_meet_and_every_receive_buffer_gets_the_mean() {
    let (ranks, count) = (3, 64);
    for elem in [Elem::F32, Elem::Bf16] {
        let clique = Clique::new(ranks);
        // Rank 1 reduces in place; the others into their own buffers.
        let mut sends: Vec<Vec<u8>> = (0..ranks)
            .map(|r| bytes_of(elem, &rank_values(r, count)))
            .collect();
        let inputs = sends.clone();
        let mut recvs: Vec<Vec<u8>> = (0..ranks).map(|_| vec![0u8; count * elem.size()]).collect();
        let parts: Vec<Part> = (0..ranks)
            .map(|r| Part {
                send: range(&mut sends[r]),
                recv: if r == 1 {
                    range(&mut sends[r])
                } else {
                    range(&mut recvs[r])
                },
                count,
                elem,
                op: RedOp::Avg,
            })
            .collect();
        std::thread::scope(|s| {
            for (rank, part) in parts.into_iter().enumerate() {
                let clique = &clique;
                s.spawn(move || {
                    clique
                        .all_reduce(1, rank, part, Duration::from_secs(30))
                        .unwrap()
                });
            }
        });
        for (r, recv) in recvs.iter().enumerate() {
            let out = if r == 1 { &sends[1] } else { recv };
            for i in 0..count {
                let mean: f32 =
                    (0..ranks).map(|q| elem.load(&inputs[q], i)).sum::<f32>() / ranks as f32;
                let want = elem.load(&bytes_of(elem, &[mean]), 0);
                assert_eq!(elem.load(out, i), want, "rank {r} [{i}] {elem:?}");
            }
        }
    }
}

#[test]
fn disagreeing_ranks_and_missing_peers_fail_the_collective() {
    let clique = Clique::new(2);
    let mut a = vec![0u8; 16];
    let mut b = vec![0u8; 8];
    let pa = Part {
        send: range(&mut a),
        recv: range(&mut a),
        count: 4,
        elem: Elem::F32,
        op: RedOp::Sum,
    };
    let pb = Part {
        send: range(&mut b),
        recv: range(&mut b),
        count: 2,
        ..pa
    };
    let results: Vec<Result<(), crate::error::MockError>> = std::thread::scope(|s| {
        let h: Vec<_> = [(0, pa), (1, pb)]
            .into_iter()
            .map(|(r, p)| {
                let clique = &clique;
                s.spawn(move || clique.all_reduce(1, r, p, Duration::from_secs(30)))
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert!(r.unwrap_err().0.contains("disagree"));
    }
    // Rank 1 never comes: rank 0 gives up, naming it.
    let e = clique
        .all_reduce(2, 0, pa, Duration::from_millis(50))
        .unwrap_err();
    assert!(e.0.contains("ranks [1]"), "{}", e.0);
}

#[test]
fn communicators_groups_and_results_as_documented() {
    unsafe {
        let mut v = 0;
        assert_eq!(ncclGetVersion(&mut v), SUCCESS);
        assert_eq!(v, 2_30_00);
        let mut comms = [null_mut::<c_void>(); 2];
        let dup = [0, 0];
        assert_eq!(
            ncclCommInitAll(comms.as_mut_ptr(), 2, dup.as_ptr()),
            INVALID_ARGUMENT
        );
        assert_eq!(
            ncclCommInitAll(comms.as_mut_ptr(), 0, std::ptr::null()),
            INVALID_ARGUMENT
        );
        let devs = [1, 0];
        assert_eq!(
            ncclCommInitAll(comms.as_mut_ptr(), 2, devs.as_ptr()),
            SUCCESS
        );
        let (mut n, mut d, mut r) = (0 as c_int, 0 as c_int, 0 as c_int);
        assert_eq!(ncclCommCount(comms[1], &mut n), SUCCESS);
        assert_eq!(ncclCommCuDevice(comms[1], &mut d), SUCCESS);
        assert_eq!(ncclCommUserRank(comms[1], &mut r), SUCCESS);
        assert_eq!((n, d, r), (2, 0, 1));
        // Groups nest; an end without a start is misuse.
        assert_eq!(ncclGroupStart(), SUCCESS);
        assert_eq!(ncclGroupStart(), SUCCESS);
        assert_eq!(ncclGroupEnd(), SUCCESS);
        assert_eq!(ncclGroupEnd(), SUCCESS);
        assert_eq!(ncclGroupEnd(), INVALID_USAGE);
        // Arguments are checked at the call.
        let x = 0x7000_0000_0000usize as *mut c_void;
        assert_eq!(
            ncclAllReduce(x, x, 4, 7, 9, comms[0], null_mut()),
            INVALID_ARGUMENT
        );
        assert_eq!(
            ncclAllReduce(std::ptr::null(), x, 4, 7, 4, comms[0], null_mut()),
            INVALID_ARGUMENT
        );
        assert_eq!(ncclCommDestroy(comms[0]), SUCCESS);
        assert_eq!(ncclCommDestroy(comms[0]), INVALID_ARGUMENT);
        assert_eq!(
            ncclAllReduce(x, x, 4, 7, 4, comms[0], null_mut()),
            INVALID_ARGUMENT
        );
        assert_eq!(ncclCommDestroy(comms[1]), SUCCESS);
        let text = CStr::from_ptr(ncclGetErrorString(INVALID_ARGUMENT))
            .to_str()
            .unwrap();
        assert!(text.starts_with("invalid argument"), "{text}");
        assert_eq!(devices(3, None).unwrap(), vec![0, 1, 2]);
    }
}

/// Ranks `0..ranks` of one id, each initialised on its own thread (as separate processes
/// would), in rank order.
fn net_comms(ranks: usize, timeout: Duration) -> Vec<net::NetComm> {
    let id = net::new_id();
    std::thread::scope(|s| {
        let h: Vec<_> = (0..ranks)
            .map(|r| s.spawn(move || net::NetComm::init(&id, ranks, r, timeout)))
            .collect();
        h.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

#[test]
fn ranks_of_one_id_meet_and_store_the_same_bits() {
    let ranks = 3;
    let comms = net_comms(ranks, Duration::from_secs(20));
    let mut seq = 0;
    for elem in [Elem::F32, Elem::Bf16] {
        for op in [RedOp::Avg, RedOp::Sum, RedOp::Max] {
            seq += 1;
            let count = 1000;
            let inputs: Vec<Vec<u8>> = (0..ranks)
                .map(|r| bytes_of(elem, &rank_values(r, count)))
                .collect();
            // Rank 0 and 2 in place, rank 1 into another buffer.
            let mut sends = inputs.clone();
            let mut recvs: Vec<Vec<u8>> =
                (0..ranks).map(|_| vec![0u8; count * elem.size()]).collect();
            let parts: Vec<Part> = (0..ranks)
                .map(|r| Part {
                    send: range(&mut sends[r]),
                    recv: if r == 1 {
                        range(&mut recvs[r])
                    } else {
                        range(&mut sends[r])
                    },
                    count,
                    elem,
                    op,
                })
                .collect();
            std::thread::scope(|s| {
                for (c, p) in comms.iter().zip(parts) {
                    // SAFETY: each thread's buffers are its own until the scope ends.
                    s.spawn(move || unsafe { c.all_reduce(seq, p) }.unwrap());
                }
            });
            let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let want = bytes_of(elem, &reduce(op, elem, &views, count));
            assert_eq!(sends[0], want, "rank 0 {elem:?} {op:?}");
            assert_eq!(recvs[1], want, "rank 1 {elem:?} {op:?}");
            assert_eq!(sends[2], want, "rank 2 {elem:?} {op:?}");
            // Rank 1's send buffer is untouched.
            assert_eq!(sends[1], inputs[1]);
        }
    }
}

#[test]
fn a_rank_that_never_arrives_fails_the_others_after_the_timeout() {
    let id = net::new_id();
    let start = std::time::Instant::now();
    let e = net::NetComm::init(&id, 3, 0, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(e.contains("ranks [1, 2] of 3, which never arrived"), "{e}");
    assert!(e.contains(net::TIMEOUT_ENV), "{e}");
    let e = net::NetComm::init(&net::new_id(), 2, 1, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(e.contains("rank 1 of 2 could not reach rank 0"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Not this mock's id.
    let e = net::NetComm::init(&[0u8; 128], 2, 1, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn a_rank_gone_mid_run_fails_the_collective_on_every_other_rank() {
    let ranks = 3;
    let mut comms = net_comms(ranks, Duration::from_secs(20));
    // Rank 2 leaves (as its process would on exit: the kernel closes its sockets).
    let gone = comms.pop().unwrap();
    gone.shut_down();
    drop(gone);
    let count = 8;
    let mut bufs: Vec<Vec<u8>> = (0..2)
        .map(|r| bytes_of(Elem::F32, &rank_values(r, count)))
        .collect();
    let parts: Vec<Part> = bufs
        .iter_mut()
        .map(|b| Part {
            send: range(b),
            recv: range(b),
            count,
            elem: Elem::F32,
            op: RedOp::Avg,
        })
        .collect();
    let errs: Vec<String> = std::thread::scope(|s| {
        let h: Vec<_> = comms
            .iter()
            .zip(parts)
            // SAFETY: each thread's buffer is its own.
            .map(|(c, p)| s.spawn(move || unsafe { c.all_reduce(1, p) }.unwrap_err()))
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errs {
        assert!(e.contains("rank 2 is gone"), "{e}");
    }
    // The communicator is broken from then on.
    let mut b = vec![0u8; 4];
    let p = Part {
        send: range(&mut b),
        recv: range(&mut b),
        count: 1,
        elem: Elem::F32,
        op: RedOp::Sum,
    };
    let e = unsafe { comms[0].all_reduce(2, p) }.unwrap_err();
    assert!(e.contains("broken"), "{e}");
}

#[test]
fn unique_ids_and_rank_communicators_through_the_entry_points() {
    unsafe {
        let mut a = UniqueId { internal: [0; 128] };
        let mut b = UniqueId { internal: [0; 128] };
        assert_eq!(ncclGetUniqueId(&mut a), SUCCESS);
        assert_eq!(ncclGetUniqueId(&mut b), SUCCESS);
        assert_eq!(a.internal[..8], net::ID_MAGIC);
        assert_ne!(a.internal[..], b.internal[..], "two ids name two meetings");
        assert_ne!(net::meeting_dir(&a.internal), net::meeting_dir(&b.internal));
        // One rank alone needs nobody.
        let mut comm = null_mut();
        assert_eq!(ncclCommInitRank(&mut comm, 1, a, 0), SUCCESS);
        let (mut n, mut r, mut err) = (0 as c_int, 0 as c_int, 99u32);
        assert_eq!(ncclCommCount(comm, &mut n), SUCCESS);
        assert_eq!(ncclCommUserRank(comm, &mut r), SUCCESS);
        assert_eq!(ncclCommGetAsyncError(comm, &mut err), SUCCESS);
        assert_eq!((n, r, err), (1, 0, SUCCESS));
        assert_eq!(ncclCommAbort(comm), SUCCESS);
        assert_eq!(ncclCommGetAsyncError(comm, &mut err), INVALID_ARGUMENT);
        // A rank outside the world, or an id this mock did not make.
        assert_eq!(ncclCommInitRank(&mut comm, 2, a, 2), INVALID_ARGUMENT);
        let zero = UniqueId { internal: [0; 128] };
        assert_eq!(ncclCommInitRank(&mut comm, 2, zero, 1), INVALID_ARGUMENT);
        let text = CStr::from_ptr(ncclGetErrorString(REMOTE_ERROR))
            .to_str()
            .unwrap();
        assert!(text.starts_with("remote process exited"), "{text}");
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking` set.
fn config(blocking: c_int) -> ConfigHead {
    ConfigHead {
        size: std::mem::size_of::<ConfigHead>(),
        magic: CONFIG_MAGIC,
        version: VERSION as u32,
        blocking,
    }
}

/// Polls a communicator made without blocking until it is no longer in progress, or `limit`.
unsafe fn poll(comm: *mut c_void, limit: Duration) -> NcclResult {
    let start = std::time::Instant::now();
    loop {
        let mut state = 99u32;
        assert_eq!(ncclCommGetAsyncError(comm, &mut state), SUCCESS);
        if state != IN_PROGRESS || start.elapsed() > limit {
            return state;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_nonblocking_communicator_is_in_progress_until_every_rank_joins() {
    unsafe {
        let mut id = UniqueId { internal: [0; 128] };
        assert_eq!(ncclGetUniqueId(&mut id), SUCCESS);
        // Rank 0 of 2 alone: returned at once, in progress while rank 1 is away, and no
        // collective until it has joined.
        let mut zero = null_mut();
        let c0 = config(0);
        assert_eq!(
            ncclCommInitRankConfig(&mut zero, 2, id, 0, &c0),
            IN_PROGRESS
        );
        assert_eq!(poll(zero, Duration::from_millis(200)), IN_PROGRESS);
        let mut v = [1f32];
        let p = v.as_mut_ptr() as *mut c_void;
        assert_eq!(
            ncclAllReduce(p, p, 1, 7, 0, zero, null_mut()),
            INVALID_USAGE
        );
        // Rank 1 comes (blocking, on another thread, as another process would): both joined.
        let one = std::thread::spawn(move || {
            let mut comm = null_mut();
            let r = ncclCommInitRankConfig(&mut comm, 2, id, 1, &config(1));
            (r, comm as usize)
        });
        assert_eq!(poll(zero, Duration::from_secs(20)), SUCCESS);
        let (r, one) = one.join().unwrap();
        assert_eq!(r, SUCCESS);
        let mut n = 0 as c_int;
        assert_eq!(ncclCommCount(zero, &mut n), SUCCESS);
        assert_eq!(n, 2);
        assert_eq!(ncclCommDestroy(zero), SUCCESS);
        assert_eq!(ncclCommDestroy(one as *mut c_void), SUCCESS);

        // A rank that never joins: in progress until the caller gives up and aborts; the
        // meeting is then given up (its directory removed), not left to the peer timeout.
        let mut id = UniqueId { internal: [0; 128] };
        assert_eq!(ncclGetUniqueId(&mut id), SUCCESS);
        let mut lone = null_mut();
        assert_eq!(
            ncclCommInitRankConfig(&mut lone, 3, id, 0, &c0),
            IN_PROGRESS
        );
        assert_eq!(poll(lone, Duration::from_millis(300)), IN_PROGRESS);
        let dir = net::meeting_dir(&id.internal).unwrap();
        assert!(dir.exists());
        assert_eq!(ncclCommAbort(lone), SUCCESS);
        let start = std::time::Instant::now();
        while dir.exists() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!dir.exists(), "the aborted meeting was left behind");
        let mut state = 0u32;
        assert_eq!(ncclCommGetAsyncError(lone, &mut state), INVALID_ARGUMENT);

        // A config that does not start from NCCL_CONFIG_INITIALIZER.
        let bad = ConfigHead {
            magic: 0,
            ..config(0)
        };
        assert_eq!(
            ncclCommInitRankConfig(&mut lone, 2, id, 0, &bad),
            INVALID_ARGUMENT
        );
    }
}
