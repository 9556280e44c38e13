//! libFuzzer entry point of the `server_bytes` target (see `nbd_fuzz::server_bytes`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::server_bytes(data);
});
