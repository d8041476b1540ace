//! tern's disks: volumes (sparse raw files) and their replication to another site.
//!
//! A volume's primary serves it to QEMU over NBD (`tern-nbd`) and replicates every write to
//! a secondary at another site over one byte stream (the site nodes' relay, so the transport
//! encrypts, authenticates, paces and repairs it). The protocol (`wire`) and both ends
//! (`primary`, `secondary`) are sans-IO; `volume` and `server` are the drivers.
//!
//! Guarantees:
//! - The secondary applies writes in the order the primary's volume changed, and says a
//!   sequence number is acknowledged only once it and everything before it is durable.
//! - `sync` mode acknowledges a guest write only after the secondary's ACK (DRBD protocol
//!   C); `async` after the local write (protocol A) with at most a bounded backlog in
//!   flight; `auto` is async until the initial sync is acknowledged and the backlog drained,
//!   then sync (CloudNet's choreography before memory migration).
//! - Each session starts by comparing per-chunk hashes, so a cut link or a restarted node
//!   resumes without re-sending what arrived, and an older copy only receives what changed.
//! - A secondary is *consistent* only after a completed sync is durable there; promotion of
//!   an inconsistent copy is refused.

mod backup;
pub mod counters;
pub mod daemon;
mod nic;
pub mod primary;
pub mod secondary;
pub mod server;
pub mod volume;
pub mod wal;
pub mod wire;

use serde::{Deserialize, Serialize};

/// Blocks of 64 KiB: the scan unit, and the unit of `tern disk verify`.
pub const BLOCK_SHIFT: u8 = 16;
pub const BLOCK_BYTES: u64 = 1 << BLOCK_SHIFT;
/// Chunks of 4 KiB (a filesystem block) are the unit of comparison (8 bytes of hash per
/// non-zero chunk, one bit per zero chunk), zero detection and deduplication. Blocks of
/// 64 KiB are the unit the primary scans.
pub const CHUNK: usize = 4096;

/// When a guest write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Async,
    Sync,
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "async" => Ok(Mode::Async),
            "sync" => Ok(Mode::Sync),
            "auto" => Ok(Mode::Auto),
            _ => Err(format!("unknown mode {s:?} (async, sync or auto)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::Auto => "auto",
        })
    }
}

/// The 16-byte BLAKE3 prefix tern compares blocks and chunks by.
pub fn block_hash(data: &[u8]) -> wire::Hash {
    let h = blake3::hash(data);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

/// A chunk's hash as compared between primary and secondary: 0 for all-zero bytes, else
/// the first 8 bytes of its BLAKE3 (never 0). Equal hashes at the same offset count as equal
/// content: a false match has probability 2^-64 per changed chunk.
pub fn chunk_hash(data: &[u8]) -> wire::ChunkHash {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let h = blake3::hash(data);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// The hash of `len` zero bytes (a full block or the volume's last, shorter one).
pub fn zero_hash(len: usize) -> wire::Hash {
    static FULL: std::sync::OnceLock<wire::Hash> = std::sync::OnceLock::new();
    if len == BLOCK_BYTES as usize {
        *FULL.get_or_init(|| block_hash(&vec![0u8; BLOCK_BYTES as usize]))
    } else {
        block_hash(&vec![0u8; len])
    }
}
