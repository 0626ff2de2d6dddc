//! End-to-end tests: the real `scratchd` binary driven by real NBD clients
//! (libnbd's tools, qemu, fio) and by raw sockets for malformed input.
//!
//! One test binary with modules keeps link time down on small machines.
//! The clients are installed by `scripts/test.sh`; a missing one fails the
//! test with a message saying what to install, never skips it silently.

#![forbid(unsafe_code)]

mod attach;
mod bad_input;
mod cli;
mod ctl;
mod faults;
mod fio;
mod front;
mod generate;
mod hardening;
mod hostile_server;
mod idle;
mod isolation;
mod kernel_guest;
mod kernel_vm;
mod limits;
mod load;
mod mock;
mod nbdcopy;
mod nbdinfo;
mod nbdsh;
mod ordering;
mod qemu;
mod run;
mod service;
mod session_fuzz;
mod shutdown;
mod slots;
mod snapshots;
mod stuck;
mod tls;
mod tmpdisk;
mod util;
mod wire;
