//! See [`scratchd_fuzzing::storage()`] for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scratchd_fuzzing::storage(data));
