//! The host simulator itself (`recycle_kernels::sim`): it builds, runs grid-stride and
//! block-reduction kernels like a GPU would, and reports what it must (unknown kernels, bad
//! shapes, writes past a buffer). The families' checks against their CPU twins live with their
//! launchers in the engine (`cuda::*` tests) and, for the fused loss, in the root crate.

use std::ffi::c_void;

use recycle_kernels::launch;
use recycle_kernels::sim::{HostSim, SimBuffer};

fn sim() -> Option<&'static HostSim> {
    HostSim::for_tests()
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
    let (mut pa, mut pb, mut po, mut pn) = (ba.ptr(), bb.ptr(), out.ptr(), n as u64);
    let mut params = [
        &mut pa as *mut u64 as *mut c_void,
        &mut pb as *mut u64 as *mut c_void,
        &mut po as *mut u64 as *mut c_void,
        &mut pn as *mut u64 as *mut c_void,
    ];
    let cfg = launch::elementwise(n as u64).unwrap();
    // SAFETY: add_f32(a, b, out, n) with three live buffers of n floats.
    unsafe { sim.launch("add_f32", &cfg, &mut params) }.unwrap();
    let got = out.read::<f32>().unwrap();
    for i in 0..n {
        assert_eq!(got[i], a[i] + b[i], "element {i}");
    }
}

#[test]
fn a_block_reduction_sums_a_row_through_shuffles_and_barriers() {
    let Some(sim) = sim() else { return };
    // sum_all_f32(x, out, n, divisor): one block adds everything (f64 inside, see layout.cu).
    let n = 5000usize;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.25).collect();
    let (bx, out) = (SimBuffer::from_slice(&x), SimBuffer::zeros::<f32>(1));
    let (mut px, mut po, mut pn, mut pd) = (bx.ptr(), out.ptr(), n as u64, 1u64);
    let mut params = [
        &mut px as *mut u64 as *mut c_void,
        &mut po as *mut u64 as *mut c_void,
        &mut pn as *mut u64 as *mut c_void,
        &mut pd as *mut u64 as *mut c_void,
    ];
    let cfg = launch::single_block();
    // SAFETY: sum_all_f32(x, out, n, divisor) with n floats in and one out.
    unsafe { sim.launch("sum_all_f32", &cfg, &mut params) }.unwrap();
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
