//! # tern-wan — the driver of tern's userspace WAN link emulator
//!
//! The kernel on tern's machines has no netem, so delay, jitter, loss and rate are applied
//! here, between two TUN devices (usually one in each lab site's network namespace). The
//! model lives in `tern-link` (sans-IO); this crate is the thin loop around it:
//!
//! ```text
//!   TUN A ──read──▶ [thread a-to-b: Link model] ──write──▶ TUN B
//!   TUN A ◀─write── [thread b-to-a: Link model] ◀──read─── TUN B
//!                         ▲ commands (eventfd wake-up)
//!   control socket (JSON lines: stats, set, shutdown)
//! ```
//!
//! Each direction thread sleeps in `ppoll` on its input device and a wake-up eventfd, with
//! the model's next deadline as the timeout (timer slack 1 µs). Packets are read in batches,
//! offered to the model with the monotonic time, and written as soon as the model releases
//! them. Packet buffers are pooled; nothing is allocated per packet in steady state. Runs of
//! consecutive TCP segments of one flow released together are written as one GSO packet
//! (`gso`), which spares the receiving stack most of its per-packet work.

mod control;
mod emulator;
pub mod gso;
mod pcap;
pub mod proto;
mod sys;

pub use control::{request, serve};
pub use emulator::{Emulator, EmulatorOptions, MAX_PACKET_BYTES, PcapOptions, TunSide};
pub use pcap::PcapWriter;

#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("invalid link settings")]
    Config(#[from] tern_link::ConfigError),
    #[error("cannot open TUN device {dev:?} (namespace {netns:?})")]
    Tun {
        dev: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("emulator control protocol: {0}")]
    Protocol(String),
    #[error("the emulator has stopped")]
    Stopped,
}
