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
