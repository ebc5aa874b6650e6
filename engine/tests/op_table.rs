//! The op table (`recycle_engine::op_table`) on every device: each case's gradient check on
//! the CPU, and each case on `cuda:0` against the CPU, with the casts and optimizer steps held
//! to the CPU's bits, where `cuda:0` opens (a GPU, or the mock
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

/// Whether `cuda:0` opens; where it does not, checks that the failure is the engine's account
/// of what is missing (a failure under `RECYCLE_EXPECT_CUDA`).
fn cuda0_opens() -> bool {
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
        return false;
    }
    true
}

#[test]
fn on_cuda0_every_case_matches_the_cpu() {
    if !cuda0_opens() {
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

/// The rows of a comparison that fail, one line each.
fn misses(rows: &[op_table::Compared]) -> Vec<String> {
    rows.iter()
        .filter(|r| !r.pass())
        .map(|r| format!("{}: {} elements differ", r.label, r.err))
        .collect()
}

/// Casts on cuda:0 are the CPU's bits: every bf16 pattern widened, and f32 values rounded to
/// nearest even (ties both ways, subnormals, infinities, NaN), plain and on the tape.
#[test]
fn on_cuda0_casts_are_the_cpus_bits() {
    if !cuda0_opens() {
        return;
    }
    let rows = op_table::compare_casts(Device::Cuda(0)).unwrap();
    assert_eq!(rows.len(), 6);
    let misses = misses(&rows);
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// Four SGDW and AdamW steps on cuda:0 give the CPU update's bits: the parameters, the
/// optimizer state and the bf16 working copy.
#[test]
fn on_cuda0_optimizer_steps_are_the_cpus_bits() {
    if !cuda0_opens() {
        return;
    }
    let rows = op_table::compare_optimizer_steps(Device::Cuda(0)).unwrap();
    assert_eq!(rows.len(), 14);
    let misses = misses(&rows);
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}
