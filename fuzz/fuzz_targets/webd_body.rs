#![no_main]
// See crates/pocket-fuzz: pocket_fuzz::webd_body.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pocket_fuzz::webd_body(data));
