//! The client against real servers: scratchd's own (in this process),
//! nbdkit and qemu-nbd (child processes). One test binary with modules
//! keeps link time down.

#![forbid(unsafe_code)]

mod checks;
mod model;
mod nbdkit;
mod qemu;
mod scratchd;
mod util;
mod write_behind;
