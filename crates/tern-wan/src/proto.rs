//! The emulator's control protocol: one JSON object per line over a unix socket, one reply
//! line per request. Version 1; unknown fields are rejected.

use serde::{Deserialize, Serialize};
use tern_link::{DirectionConfig, DirectionStats};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Which direction(s) a change applies to. `a_to_b` carries traffic sent by site A.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    AToB,
    BToA,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Current settings and counters of both directions.
    Stats,
    /// Replace the settings of one direction; queued packets are kept.
    Set {
        direction: Direction,
        config: DirectionConfig,
    },
    /// Stop forwarding and exit.
    Shutdown,
}

/// Driver-side counters that the link model cannot see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriverCounters {
    pub read_errors: u64,
    /// Packets the output device refused (e.g. it is down).
    pub write_errors: u64,
    /// Packets not captured because the pcap size cap was reached.
    pub pcap_skipped: u64,
    /// Packets read with an offload header the emulator did not ask for (dropped).
    pub unexpected_offload: u64,
    /// GSO writes, and the packets they carried (egress coalescing).
    pub merged_writes: u64,
    pub merged_packets: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionReport {
    pub direction: Direction,
    pub config: DirectionConfig,
    pub stats: DirectionStats,
    pub driver: DriverCounters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    pub version: u32,
    pub pid: u32,
    pub seed: u64,
    pub uptime_ms: u64,
    pub a_to_b: DirectionReport,
    pub b_to_a: DirectionReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Stats(Box<StatsReply>),
    Ok,
    Error { message: String },
}
