//! The GGUF header reader on arbitrary bytes: it may reject them, but never panic, never read or
//! allocate beyond the input, and whatever it accepts lies inside it (RELIABILITY item 1).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| xllm_core::gguf::fuzz_one(data));
