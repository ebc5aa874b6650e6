#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| recycle_fuzz::targets::text_shards(data));
