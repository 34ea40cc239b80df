#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distq_fuzz::dispatch(data));
