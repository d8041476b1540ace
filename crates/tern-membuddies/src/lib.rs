//! # tern-membuddies — memory-sharing-aware placement (Memory Buddies)
//!
//! Sans-IO core: page hashing ([`hash`]), per-VM fingerprints with self-sharing removed
//! ([`fingerprint`]), Bloom filters ([`bloom`]), the sharing estimators ([`estimate`]),
//! placement / consolidation / hotspot mitigation / offline planning ([`place`]) and the
//! synthetic 100-host simulation ([`sim`]). Nothing here opens sockets, spawns threads or
//! reads the clock. The only I/O lives in [`reader`], a thin driver that feeds bytes of a
//! file or of a QEMU process's RAM (`/proc/PID/mem`) into a [`fingerprint::FingerprintBuilder`].
//!
//! Design note: `docs/membuddies.md`.

pub mod bloom;
pub mod estimate;
pub mod fingerprint;
pub mod hash;
pub mod place;
pub mod reader;
pub mod rng;
pub mod sim;

pub use bloom::BloomFilter;
pub use fingerprint::{Fingerprint, FingerprintBuilder, PageMap};
pub use hash::{PAGE_SIZE_BYTES, page_hash};

/// Errors of the decoders and of operations on mismatched filters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembuddiesError {
    #[error("decode {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("bloom filters differ in shape: {a_bits} bits/k={a_k} vs {b_bits} bits/k={b_k}")]
    ShapeMismatch {
        a_bits: u64,
        a_k: u8,
        b_bits: u64,
        b_k: u8,
    },
    #[error("bloom filter shape invalid: {detail}")]
    BadShape { detail: String },
    #[error("page index {index} out of range ({pages} pages)")]
    PageOutOfRange { index: u64, pages: u64 },
    #[error("{what} exceeds limit {limit}")]
    Limit { what: &'static str, limit: u64 },
    #[error("placement: {detail}")]
    Placement { detail: String },
}
