#![no_main]
// See crates/pocket-fuzz: pocket_fuzz::grub_env.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pocket_fuzz::grub_env(data));
