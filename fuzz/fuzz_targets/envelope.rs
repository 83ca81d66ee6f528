#![no_main]
// See crates/pocket-fuzz: pocket_fuzz::envelope.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pocket_fuzz::envelope(data));
