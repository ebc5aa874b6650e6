#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| recycle_fuzz::trainer_abi::trainer_abi(data));
