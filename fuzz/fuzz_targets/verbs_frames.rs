#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| freeflow_fuzz::verbs_frames(data));
