#![no_main]
// See crates/pocket-fuzz: pocket_fuzz::uboot_env.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pocket_fuzz::uboot_env(data));
