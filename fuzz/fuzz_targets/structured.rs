//! libFuzzer entry point of the `structured` target (see `nbd_fuzz::structured`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::structured(data);
});
