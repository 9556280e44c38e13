//! mio adapter for the `nbd-proto` NBD client: the core driven by a caller's event loop.
