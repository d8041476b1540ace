//! tern-migrate: live migration of a QEMU VM from one lab site to the other.
//!
//! ```text
//! tern migrate NAME --to b
//!   source QEMU (site a) --fd--> node a ==transport stream (kind unix)==> node b --> dest QEMU
//!        |  getfd + migrate fd:                                            -incoming unix:
//!        |  tern-codec re-encoding (RE,       zstd records, back-pressure
//!        |  deltas, content store)
//!        `-- QMP: query-migrate every 100 ms -> Monitor (progress, stall), SmartStop
//!                                              (switchover point) -> summary
//! tern migrate NAME --to b --direct
//!   source QEMU --TCP (kernel cubic/bbr, through the emulated link)--> dest QEMU -incoming tcp:
//! ```
//! Guarantees: the source VM keeps running until QEMU's own switchover; on failure, stall or
//! a cut link before the destination may have run, the migration is cancelled, the
//! destination QEMU is killed and the source is left running (resumed if QEMU had paused
//! it). Once the destination may have run the source is never resumed (`settle`); a
//! migration whose `tern migrate` died is settled by `tern migrate NAME --recover`. With
//! `check_memory`, the destination is started paused (`-S`) and both guests' RAM is
//! compared byte for byte before it resumes.

pub mod disk;
pub mod memcmp;
pub mod monitor;
pub mod protect;
pub mod relay;
pub mod run;
pub mod settle;
mod sites;
pub mod smartstop;

pub use run::{MigrateError, MigrateOptions, MigrateReport, Route, migrate};
