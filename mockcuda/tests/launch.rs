//! Kernels from the engine's own fatbins run on the simulator through cuModuleLoadData,
//! cuModuleGetFunction and cuLaunchKernel; a host pointer passed to a kernel is refused with
//! the kernel's and the parameter's names.

mod common;

use std::ffi::c_void;

use mockcuda::driver::*;
use mockcuda::module::*;
use recycle_kernels::launchers;

#[test]
fn add_f32_runs_on_the_simulator_and_host_pointers_are_refused() {
    if recycle_kernels::sim::HostSim::for_tests().is_none() {
        return;
    }
    common::init();
    let image = recycle_kernels::family("elementwise").expect("the elementwise family");
    let mut module = std::ptr::null_mut();
    let mut f = std::ptr::null_mut();
    // SAFETY: a fatbin image and valid output pointers.
    unsafe {
        assert_eq!(
            cuModuleLoadData(&mut module, image.as_ptr() as *const c_void),
            SUCCESS
        );
        assert_eq!(
            cuModuleGetFunction(&mut f, module, c"add_f32".as_ptr()),
            SUCCESS
        );
        assert_eq!(
            cuModuleGetFunction(&mut f, module, c"no_such_kernel".as_ptr()),
            NOT_FOUND
        );
        assert_eq!(
            cuModuleGetFunction(&mut f, module, c"add_f32".as_ptr()),
            SUCCESS
        );
    }
    let s = common::non_blocking_stream();
    let n = 1000usize;
    let (a, b, out) = (
        common::alloc_async(n * 4, s),
        common::alloc_async(n * 4, s),
        common::alloc_async(n * 4, s),
    );
    let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let ys: Vec<f32> = (0..n).map(|i| 0.5 * i as f32).collect();
    let config = recycle_kernels::launch::elementwise(n as u64).unwrap();
    common::upload(a, &xs, s);
    common::upload(b, &ys, s);
    // The engine's call: the generated launcher's parameter array.
    let launch = |a: u64, b: u64, out: u64| {
        let p = recycle_kernels::call::Ptr::<f32>::new;
        let call = launchers::add::<f32>(config, p(a), p(b), p(out), n as u64);
        let [gx, gy, gz] = call.config.grid;
        let [bx, by, bz] = call.config.block;
        call.with_params(|params| {
            // SAFETY: add_f32's four parameters, each pointing to its value.
            unsafe {
                cuLaunchKernel(
                    f,
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    0,
                    s,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
        })
    };
    assert_eq!(launch(a, b, out), SUCCESS);
    let got = common::download(out, n, s);
    let want: Vec<f32> = xs.iter().zip(&ys).map(|(x, y)| x + y).collect();
    assert_eq!(got, want);
    // A host buffer as the output parameter.
    let mut host = vec![0f32; n];
    assert_eq!(launch(a, b, host.as_mut_ptr() as u64), INVALID_VALUE);
    assert!(mockcuda::stream::sticky().is_none());
    // add_f32 reads a and b (const) and writes out: found from the kernel's source.
    assert_eq!(
        params("add_f32").unwrap(),
        [
            Param::Ptr(true),
            Param::Ptr(true),
            Param::Ptr(false),
            Param::Value(8)
        ]
    );
}

#[test]
fn every_kernel_has_its_parameters_and_their_constness() {
    for (_, kernels) in recycle_kernels::launchers::FAMILIES {
        for k in *kernels {
            let p = params(k).unwrap_or_else(|| panic!("{k}: no parameters"));
            let sig = recycle_kernels::call::Signature::of(k).unwrap();
            assert_eq!(p.len(), sig.params.len(), "{k}");
        }
    }
    // The row kernels of the fused loss: logits read, grad written, teachers by value.
    assert_eq!(
        params("kd_loss_kl_f32_bf16").unwrap()[..3],
        [Param::Ptr(true), Param::Ptr(false), Param::Teachers]
    );
}
