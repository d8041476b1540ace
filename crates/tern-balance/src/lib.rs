//! # tern-balance — Sandpiper's controller core (sans-IO)
//!
//! Hotspot detection and mitigation for a pool of hosts running VMs (Wood et al.,
//! Sandpiper): per-VM and per-host profiles over a sliding window, k-out-of-n + AR(1)
//! detection, black-box and gray-box provisioning, and a planner that resizes in place
//! first, then migrates by volume-to-size ratio, then swaps through a scratch host, then
//! (beyond Sandpiper) makes multi-way moves. A plan is computed in full before anything
//! moves; it is a list of steps with dependencies and a concurrency cap, and every decision
//! carries its inputs ([`explain`]).
//!
//! Guarantees: no sockets, files, threads or clock reads. Time is an argument, randomness
//! (the simulator's) comes from a seeded generator, and every map whose order is observable
//! is ordered, so the same inputs give the same plan byte for byte.
//!
//! One control interval (a driver's loop):
//! ```text
//!   observe_vm(vm, sample)*  ->  end_interval(now_s)  ->  plan(now_s) -> Plan
//!        ^                                                   |
//!        |            Executor::poll_start / complete        v
//!        +--------- apply(step.action) <--- driver runs the step (QMP, cgroups, migrate)
//! ```

pub mod config;
pub mod detect;
pub mod model;
pub mod profile;
pub mod provision;

pub use config::BalanceConfig;
pub use model::{AppSample, HostSpec, Pool, PoolState, VmSample, VmSpec, VmState};

/// Errors of the controller core.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("bad balance config: {detail}")]
    Config { detail: String },
    #[error("too many {what} (limit {limit})")]
    Limit { what: &'static str, limit: usize },
    #[error("duplicate {what} name {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("unknown {what} {name:?}")]
    Unknown { what: &'static str, name: String },
    #[error("{name}: {detail}")]
    Invalid { name: String, detail: String },
}
