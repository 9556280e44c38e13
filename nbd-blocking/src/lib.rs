//! Blocking adapter for the `nbd-proto` NBD client: std sockets, blocking calls.
