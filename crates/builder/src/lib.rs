//! The builder side of scratchd: a disk mounted for a build. `scratchd
//! run` gives one command a disk of its own in a private mount namespace;
//! `scratchd attach` mounts a disk on a server for every process to see,
//! until `scratchd detach`. The binary parses their command lines and
//! calls [`run::run`], [`attach::attach`] and [`detach::detach`]; it also
//! runs the two helper processes this crate starts as hidden subcommands
//! of the same executable ([`run::watchdog_main`],
//! [`holder::Holder`]).
//!
//! Layout:
//! - [`frontend`]: how a disk becomes a mounted block device, one module
//!   per front end ([`frontend::fuse`], [`frontend::kernel`]) behind one
//!   type, [`frontend::FrontEnd`]; `--attach` is [`frontend::AttachMode`];
//! - [`run`]: `scratchd run`, and its watchdog;
//! - [`attach`]: `scratchd attach`; [`holder`]: the process that keeps a
//!   FUSE attachment, and the line protocol `attach` speaks with it;
//!   [`mount_watch`]: how it notices an unmount from outside;
//! - [`detach`]: `scratchd detach`, and the sweep of what dead attachments
//!   left;
//! - [`freeze`]: which file systems `snapshot take --freeze` may freeze;
//! - [`state`]: the records of kept attachments (one JSON file each);
//! - [`remote`], [`sector`], [`id`]: what the front ends share (our client
//!   to a server, the block size a file system needs, unguessable names
//!   and the fingerprints logs show instead of names).
//!
//! The kernel primitives (FUSE file, loop device, nbd netlink, mounts and
//! namespaces) are `scratchd-attach`'s; the NBD client is
//! `scratchd-client`'s. A run's local disk comes from the caller
//! ([`run::LocalDisk`]), so that this crate does not depend on the scratch
//! disk registry.

#![forbid(unsafe_code)]

pub mod attach;
pub mod detach;
pub mod freeze;
pub mod frontend;
pub mod holder;
pub mod id;
pub mod mount_watch;
pub mod remote;
pub mod run;
pub mod sector;
pub mod state;
