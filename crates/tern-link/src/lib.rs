//! # tern-link — the sans-IO core of tern's WAN link emulator
//!
//! The kernel on tern's machines has no netem, so tern emulates WAN links itself. This crate
//! is the model of one link direction, with no I/O, threads or clock reads: the driver
//! (`tern-wan`) feeds packets in with [`Link::offer`] and takes them out with
//! [`Link::poll_deliver`], passing the current time; tests drive the same code with
//! virtual time.
//!
//! ```text
//!  offer(now, len, pkt)
//!     │  loss model (Bernoulli or Gilbert–Elliott, seeded)  ──▶ RandomDrop
//!     │  drop-tail queue (bytes and packets)               ──▶ QueueDrop
//!     ▼
//!  serialization clock: depart = max(enqueue, link_free) + len·8/rate
//!     ▼
//!  delay line: arrive = depart + delay ± jitter; FIFO order kept unless `reorder`
//!     ▼
//!  poll_deliver(now) ─▶ pkt      next_deadline_ns() tells the driver when to wake
//! ```
//!
//! Guarantees: every offered packet is either dropped (and counted as such, once) or
//! delivered exactly once; without `reorder`, delivery order is offer order; the bytes
//! leaving the serialization clock never exceed `rate × elapsed + one packet`; the same
//! seed and inputs give the same outputs.

mod config;
mod histogram;
mod link;
mod rng;

pub use config::{
    DirectionConfig, JitterShape, LinkSpec, LossModel, MAX_DELAY_US, MAX_QUEUE_BYTES,
    MAX_QUEUE_PACKETS, MAX_RATE_BPS, MIN_DEFAULT_QUEUE_BYTES, PROFILES, Profile, format_rate,
    parse_duration_us, parse_loss, parse_percent, parse_rate,
};
pub use histogram::{Histogram, HistogramSummary};
pub use link::{Counters, DirectionStats, Link, Offer};
pub use rng::Rng;

/// Errors in link settings, with the offending input.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("malformed {what}: {input:?}")]
    Malformed { what: &'static str, input: String },
    #[error("{what} out of range: {value}")]
    OutOfRange { what: &'static str, value: String },
    #[error("no profile named {name:?} (known: {known})")]
    UnknownProfile { name: String, known: String },
}
