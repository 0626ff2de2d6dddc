//! See [`scratchd_fuzzing::reply`] for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| scratchd_fuzzing::reply(data));
