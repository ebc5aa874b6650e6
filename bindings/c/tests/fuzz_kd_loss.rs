//! The C ABI fuzz target's body (`fuzz/src/abi.rs`) under `cargo test`: `recycle_kd_loss` and
//! `kd_loss_cpu` on the seed inputs, deterministic mutations of them and random bytes; no call
//! may panic. The coverage-guided run (cargo-fuzz, AddressSanitizer) goes much further; see
//! docs/reliability.md (Fuzzing).

#[path = "../../../fuzz/src/abi.rs"]
mod abi;
#[path = "../../../fuzz/src/cursor.rs"]
mod cursor;
#[path = "../../../fuzz/src/mutate.rs"]
mod mutate;

use std::path::PathBuf;

#[test]
fn kd_loss_entry_points_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/kd_loss_abi");
    let seeds = mutate::seeds(&dir);
    mutate::run(abi::kd_loss_abi, &seeds, 5000, 7);
    let mut rng = mutate::Rng(8);
    for _ in 0..2000 {
        let data: Vec<u8> = (0..rng.below(160)).map(|_| rng.next() as u8).collect();
        abi::kd_loss_abi(&data);
    }
}
