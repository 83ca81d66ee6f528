#![no_main]
// See crates/pocket-fuzz: pocket_fuzz::generate_request.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pocket_fuzz::generate_request(data));
