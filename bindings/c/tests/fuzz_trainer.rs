//! The caller-fed batch entry points' fuzz target body (`fuzz/src/trainer_abi.rs`) under
//! `cargo test`: the seed inputs, deterministic mutations of them and random bytes, fed to one
//! trainer; no call may panic. The coverage-guided run (cargo-fuzz, AddressSanitizer) goes
//! further; see docs/reliability.md (Fuzzing).

#[path = "../../../fuzz/src/cursor.rs"]
mod cursor;
#[path = "../../../fuzz/src/mutate.rs"]
mod mutate;
#[path = "../../../fuzz/src/trainer_abi.rs"]
mod trainer_abi;

use std::path::PathBuf;

#[test]
fn batch_entry_points_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/trainer_abi");
    // The seeds of well-formed image batches train and evaluate, so that the inputs reach
    // past the checks.
    for name in ["step-images", "evaluate-images"] {
        let seed = std::fs::read(dir.join(name)).unwrap();
        let status = trainer_abi::status(&seed);
        assert_eq!(status, recycle_c::RECYCLE_OK, "seed {name}: {:?}", unsafe {
            std::ffi::CStr::from_ptr(recycle_c::recycle_last_error())
        });
    }
    let seeds = mutate::seeds(&dir);
    mutate::run(trainer_abi::trainer_abi, &seeds, 800, 11);
    let mut rng = mutate::Rng(12);
    for _ in 0..300 {
        let data: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
        trainer_abi::trainer_abi(&data);
    }
}
