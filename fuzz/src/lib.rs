//! Fuzz harnesses for nbd-proto, shared by the libFuzzer targets and the corpus replay tests.
