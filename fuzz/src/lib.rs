//! Coverage-guided fuzz targets of Recycle's parsers and entry points (cargo-fuzz, libFuzzer).
//! Each binary in `fuzz_targets/` feeds libFuzzer's inputs to one function here; see
//! `docs/reliability.md (Fuzzing)` for how to run them and what they found.

pub mod abi;
pub mod cursor;
pub mod targets;
pub mod trainer_abi;
