//! The host simulator itself (`recycle_kernels::sim`): it builds, runs grid-stride and
//! block-reduction kernels like a GPU would, and reports what it must (unknown kernels, bad
//! shapes, writes past a buffer). The families' checks against their CPU twins are the op
//! table's cases on the mock CUDA, which runs its kernels here (`engine/tests/op_table.rs`).

use std::ffi::c_void;

use recycle_kernels::call::Ptr;
use recycle_kernels::launch;
use recycle_kernels::launchers as k;
use recycle_kernels::sim::{HostSim, SimBuffer};

fn sim() -> Option<&'static HostSim> {
    HostSim::for_tests()
}

/// A buffer as a kernel's pointer argument.
fn ptr<T>(b: &SimBuffer) -> Ptr<T> {
    Ptr::new(b.ptr())
}

#[test]
fn an_elementwise_kernel_covers_every_element_once() {
    let Some(sim) = sim() else { return };
    // More elements than one block, not a multiple of it.
    let n = 1000usize;
    let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..n).map(|i| 0.5 * i as f32).collect();
    let (ba, bb, out) = (
        SimBuffer::from_slice(&a),
        SimBuffer::from_slice(&b),
        SimBuffer::zeros::<f32>(n),
    );
    let cfg = launch::elementwise(n as u64).unwrap();
    let call = k::add::<f32>(cfg, ptr(&ba), ptr(&bb), ptr(&out), n as u64);
    // SAFETY: three live buffers of n floats.
    unsafe { sim.run(&call) }.unwrap();
    let got = out.read::<f32>().unwrap();
    for i in 0..n {
        assert_eq!(got[i], a[i] + b[i], "element {i}");
    }
}

#[test]
fn a_block_reduction_sums_a_row_through_shuffles_and_barriers() {
    let Some(sim) = sim() else { return };
    // sum_all_f32: one block adds everything (f64 inside, see layout.cu).
    let n = 5000usize;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.25).collect();
    let (bx, out) = (SimBuffer::from_slice(&x), SimBuffer::zeros::<f32>(1));
    let call = k::sum_all::<f32>(launch::single_block(), ptr(&bx), ptr(&out), n as u64, 1);
    // SAFETY: n floats in, one out.
    unsafe { sim.run(&call) }.unwrap();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert_eq!(out.read::<f32>().unwrap()[0], want as f32);
}

#[test]
fn launches_it_cannot_run_are_errors() {
    let Some(sim) = sim() else { return };
    let cfg = launch::single_block();
    // SAFETY: rejected before any parameter is read.
    let e = unsafe { sim.launch("conv2d_f32", &cfg, &mut []) }.unwrap_err();
    assert!(e.to_string().contains("not a kernel"), "{e}");
    let mut big = cfg;
    big.block = [2048, 1, 1];
    // SAFETY: rejected before any parameter is read.
    let e = unsafe { sim.launch("sum_all_f32", &big, &mut []) }.unwrap_err();
    assert!(e.to_string().contains("2048 threads"), "{e}");
}

/// Launches one of the simulator's own test kernels (`sim/selftest.cu`, all `(uint32_t* out)`)
/// on `blocks` blocks of `threads`, and returns the launch's result and `out`.
fn selftest(
    sim: &HostSim,
    kernel: &str,
    blocks: u32,
    threads: u32,
) -> (Result<(), String>, Vec<u32>) {
    let out = SimBuffer::from_slice(&vec![7u32; (blocks * threads) as usize]);
    let mut po = out.ptr();
    let mut params = [&mut po as *mut u64 as *mut c_void];
    let cfg = launch::LaunchConfig {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        shared_mem_bytes: 0,
    };
    // SAFETY: every self-test kernel takes one pointer to blocks x threads u32 values.
    let r = unsafe { sim.launch(kernel, &cfg, &mut params) }.map_err(|e| e.to_string());
    (r, out.read::<u32>().unwrap())
}

#[test]
fn blocks_in_parallel_each_have_their_own_shared_memory() {
    let Some(sim) = sim() else { return };
    let (r, out) = selftest(sim, "rk_sim_selftest_shared_per_block", 300, 64);
    r.unwrap();
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, (i / 64) as u32, "thread {} of block {}", i % 64, i / 64);
    }
}

#[test]
fn threads_that_return_leave_the_barriers_and_shuffles_exchange_lanes() {
    let Some(sim) = sim() else { return };
    // Thread t passes t % 4 barriers and returns; 100 threads: the last warp is partial.
    let (r, out) = selftest(sim, "rk_sim_selftest_divergent_exit", 1, 100);
    r.unwrap();
    for (t, v) in out.iter().enumerate() {
        assert_eq!(*v, (t % 4) as u32, "thread {t}");
    }
    let (r, out) = selftest(sim, "rk_sim_selftest_shuffles", 1, 64);
    r.unwrap();
    for (t, v) in out.iter().enumerate() {
        // Lane l reads lane l ^ 5's value, which is lane (l ^ 5) - 3's (or its own below 3).
        let (warp, lane) = (t / 32, t % 32);
        let s = lane ^ 5;
        let src = if s >= 3 { s - 3 } else { s };
        assert_eq!(*v, 100 * (32 * warp + src) as u32, "thread {t}");
    }
}

#[test]
fn a_stuck_block_and_a_shuffle_with_a_returned_lane_are_errors() {
    let Some(sim) = sim() else { return };
    let (r, _) = selftest(sim, "rk_sim_selftest_stuck", 3, 64);
    let e = r.unwrap_err();
    // The three blocks run in parallel and all get stuck: whichever is found first is named.
    let named_block = (0..3).any(|b| {
        e.contains(&format!(
            "block ({b}, 0, 0), thread (0, 0, 0) waits at a warp shuffle"
        ))
    });
    assert!(
        e.contains("rk_sim_selftest_stuck")
            && named_block
            && e.contains("16 running lanes of its warp never reach"),
        "{e}"
    );
    let (r, _) = selftest(sim, "rk_sim_selftest_returned_lane", 1, 32);
    let e = r.unwrap_err();
    assert!(e.contains("read lane 31, which had returned"), "{e}");
    // The simulator is still usable after a stuck launch.
    let (r, out) = selftest(sim, "rk_sim_selftest_divergent_exit", 1, 8);
    r.unwrap();
    assert_eq!(out, [0, 1, 2, 3, 0, 1, 2, 3]);
}

/// Launches from several host threads at once (as from the streams of a driver) all complete
/// with their own results.
#[test]
fn launches_from_several_threads_at_once() {
    let Some(sim) = sim() else { return };
    std::thread::scope(|s| {
        for k in 0..4u32 {
            s.spawn(move || {
                for _ in 0..5 {
                    let (r, out) = selftest(sim, "rk_sim_selftest_shared_per_block", 20 + k, 32);
                    r.unwrap();
                    assert!(out.iter().enumerate().all(|(i, v)| *v == (i / 32) as u32));
                }
            });
        }
    });
}
