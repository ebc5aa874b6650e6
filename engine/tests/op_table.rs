//! The op table (`recycle_engine::op_table`) on every device: each case's gradient check on
//! the CPU, and each case on `cuda:0` against the CPU where `cuda:0` opens (a GPU, or the mock
//! CUDA of `docs/mockcuda.md`, whose kernels run on the kernel simulator:
//! `LD_LIBRARY_PATH=<mock> RECYCLE_EXPECT_CUDA=1 cargo test -p recycle-engine --features cuda
//! --test op_table`). Where it does not open, the device case checks that the failure is the
//! engine's account of what is missing; `RECYCLE_EXPECT_CUDA=1` makes it a failure instead.

use std::collections::HashSet;

use recycle_engine::op_table::{self, FAMILIES};
use recycle_engine::Device;

#[test]
fn every_case_passes_its_gradient_check_on_the_cpu() {
    let mut failures = Vec::new();
    for case in op_table::cases() {
        if let Err(e) = op_table::grad_check(&case) {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_family_has_cases_and_names_are_unique() {
    let cases = op_table::cases();
    for family in FAMILIES {
        assert!(
            cases.iter().any(|c| c.family == family),
            "no case in {family}"
        );
    }
    let mut seen = HashSet::new();
    for c in &cases {
        assert!(FAMILIES.contains(&c.family), "{c:?}: unknown family");
        assert!(
            seen.insert((c.name.clone(), c.shape_text())),
            "{c:?} appears twice"
        );
    }
}

#[test]
fn on_cuda0_every_case_matches_the_cpu() {
    if let Err(e) = recycle_engine::cuda::device_info(0) {
        assert!(
            matches!(e, recycle_engine::Error::Device(_)),
            "the probe's error is not a device error: {e}"
        );
        assert!(
            std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
            "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e} (build with `--features \
             cuda` and put a driver, or the mock CUDA's folder, on LD_LIBRARY_PATH)"
        );
        return;
    }
    let mut draws = 0;
    let mut misses = Vec::new();
    let mut compared = 0;
    for dtype in op_table::DTYPES {
        for case in op_table::cases() {
            for row in op_table::compare(&case, dtype, Device::Cuda(0), &mut draws).unwrap() {
                compared += 1;
                if !row.pass() {
                    misses.push(format!(
                        "{} {dtype}: error {:.3e} > {:.0e}",
                        row.label, row.err, row.tol
                    ));
                }
            }
        }
    }
    assert!(compared > 100, "only {compared} quantities compared");
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}
