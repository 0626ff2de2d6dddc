//! Attach front ends: how `scratchd run` and `scratchd attach` turn a
//! block device (a local scratch disk or an NBD client) into a mounted
//! file system, and how `scratchd detach` finds what is left of one.
//!
//! Layout:
//! - [`freeze`]: a mounted file system frozen (FIFREEZE) while a snapshot
//!   of its disk is taken;
//! - [`fuse`]: the device as one file in a FUSE mount, served by several
//!   threads calling the device directly (hosts without an `nbd` module);
//! - [`loopdev`]: a loop device on that file, in direct-I/O mode, cleared
//!   automatically by the kernel when its mount goes;
//! - [`nbd_kernel`]: the kernel's nbd driver, configured over generic
//!   netlink with sockets our client negotiated (hosts with the module);
//! - [`mount`]: mounting a disk as untrusted media (`nosuid,nodev`, an
//!   explicit type) onto a directory held open, so it cannot be swapped;
//! - [`trusted_dir`]: a directory only root can change, opened once, its
//!   files reached without following symlinks (the builder's state);
//! - [`ns`]: a private mount namespace, so that every mount of a run dies
//!   with it; mounting a device, unmounting, and what is mounted where
//!   (from mountinfo).

pub mod freeze;
pub mod fuse;
pub mod loopdev;
pub mod mount;
pub mod nbd_kernel;
pub mod ns;
pub mod trusted_dir;
