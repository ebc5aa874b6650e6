#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| recycle_fuzz::abi::kd_loss_abi(data));
