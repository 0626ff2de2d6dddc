//! The operator's side: what a running server shows and takes.
//! - `admin.rs`: one snapshot of the server (exports, owners, pools,
//!   budgets) and the operator's actions (drop, keep), behind both:
//! - `ctl.rs`: the control socket (`serve --control PATH`) and `scratchd
//!   ctl`, its client;
//! - `metrics.rs`: the Prometheus endpoint (`serve --metrics ADDR`);
//! - `timed_read.rs`: a whole-request deadline for both endpoints' reads.

pub mod admin;
pub mod ctl;
pub mod metrics;
pub mod timed_read;
