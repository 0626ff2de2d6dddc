//! The builder side's commands: `scratchd run`, `attach`, `detach`,
//! `snapshot` (and
//! the hidden holder and watchdog entry points), each a thin clap layer
//! over `scratchd_builder`. A run's own disk, made with the serving side's
//! tmpdisk machinery, is opened here (`run.rs`): the library takes it as a
//! block device and knows nothing of the registry.

pub mod attach;
pub mod detach;
pub mod run;
pub mod snapshot;
