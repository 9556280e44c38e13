//! Test harness: starts real NBD servers (nbdkit, qemu-nbd, nbd-server) for the integration tests.
