//! Sans-IO NBD client.
#![forbid(unsafe_code)]
