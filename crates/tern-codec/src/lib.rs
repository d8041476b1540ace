//! Lossless re-encoding of QEMU 7.2 precopy migration streams (CloudNet's optimizations on
//! unmodified QEMU).
//!
//! ```text
//! QEMU --bytes--> Encoder (parse; choose an encoding per RAM page) --frames--> WAN
//! WAN --frames--> Decoder (rebuild the exact bytes) --bytes--> QEMU -incoming
//! ```
//! The parser ([`qemu`]) only chooses *how* bytes are sent: a RAM page may go as a literal,
//! as 1 KiB sub-blocks that are zero, literal or references into a mirrored cache
//! ([`cache::SubBlockRing`], redundancy elimination), as an XOR/run-length delta against the
//! version of that page sent before ([`delta`]), or as a reference into the destination's
//! persistent content store ([`store`]). Anything the parser does not know (a section, a
//! flag, a footer mismatch) switches the rest of the stream to raw pass-through, so a
//! misparse costs compression ratio, never correctness. Both ends evolve their caches
//! identically from the same page sequence; the sender compares bytes before it sends a
//! reference, so hash collisions cannot corrupt a page.
//!
//! Sans-IO: the encoder and decoder are pure functions of their inputs and of the store.

pub mod cache;
pub mod decoder;
pub mod delta;
pub mod encoder;
pub mod qemu;
pub mod residual;
pub mod store;
pub mod wire;

pub use decoder::{DecodeError, Decoder};
pub use encoder::Encoder;
pub use store::{ContentStore, FileStore, MemStore, Summary};

/// Target page size of x86 guests, the only one the parser accepts.
pub const PAGE: usize = 4096;
/// Sub-block size for redundancy elimination (CloudNet: four per page).
pub const SUB: usize = 1024;
/// Sub-blocks per page.
pub const SUBS: usize = PAGE / SUB;

/// Which optimizations an encoder may use. Zero pages and zero sub-blocks are always free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Redundancy elimination: 1 KiB sub-blocks as references into a mirrored cache.
    pub re: bool,
    /// Page deltas against the previous version of the same page.
    pub delta: bool,
    /// References into the destination's persistent content store.
    pub store: bool,
    /// Residual compression: one zstd stream over the frames (else the transport's
    /// per-record compression applies).
    pub zstd: bool,
}

impl Options {
    pub const NONE: Options = Options {
        re: false,
        delta: false,
        store: false,
        zstd: false,
    };
    pub const ALL: Options = Options {
        re: true,
        delta: true,
        store: true,
        zstd: true,
    };

    /// One byte on the wire: bit 0 RE, bit 1 delta, bit 2 store, bit 3 zstd.
    pub fn to_byte(self) -> u8 {
        u8::from(self.re)
            | u8::from(self.delta) << 1
            | u8::from(self.store) << 2
            | u8::from(self.zstd) << 3
    }

    pub fn from_byte(b: u8) -> Option<Options> {
        (b & !15 == 0).then_some(Options {
            re: b & 1 != 0,
            delta: b & 2 != 0,
            store: b & 4 != 0,
            zstd: b & 8 != 0,
        })
    }

    pub fn any(self) -> bool {
        self != Options::NONE
    }

    /// Parses `none|re|delta|store|zstd|all` or a `+`-joined list such as `re+delta`.
    pub fn parse(s: &str) -> Result<Options, String> {
        let mut o = Options::NONE;
        for part in s.split('+') {
            match part.trim() {
                "none" => {}
                "re" => o.re = true,
                "delta" => o.delta = true,
                "store" => o.store = true,
                "zstd" => o.zstd = true,
                "all" => o = Options::ALL,
                other => {
                    return Err(format!(
                        "unknown codec {other:?} (none, re, delta, store, zstd, all, or a list like re+delta)"
                    ));
                }
            }
        }
        Ok(o)
    }
}

impl std::fmt::Display for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.re {
            parts.push("re");
        }
        if self.delta {
            parts.push("delta");
        }
        if self.store {
            parts.push("store");
        }
        if self.zstd {
            parts.push("zstd");
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join("+"))
        }
    }
}

/// What an encoder did, in bytes of QEMU's stream and of the encoded stream. "Saved" is
/// QEMU's bytes for the item minus the encoded bytes for it, before residual compression.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Bytes read from QEMU.
    pub input_bytes: u64,
    /// Frames produced, before residual compression.
    pub frame_bytes: u64,
    /// Bytes produced (after the codec's zstd if on; the transport may still compress).
    pub output_bytes: u64,
    /// `frame_bytes - output_bytes` when the codec's zstd is on.
    pub zstd_saved: u64,
    /// RAM PAGE records seen (4 KiB payloads).
    pub pages: u64,
    /// ZERO records seen (QEMU's own zero-page elision; 9-10 bytes each).
    pub zero_pages: u64,
    /// All-zero 1 KiB sub-blocks of non-zero pages (sent as 2 bits each).
    pub zero_subblocks: u64,
    /// Bytes saved by zero sub-blocks.
    pub zero_saved: u64,
    pub re_hits: u64,
    pub re_saved: u64,
    pub delta_pages: u64,
    pub delta_saved: u64,
    pub store_hits: u64,
    pub store_saved: u64,
    pub literal_pages: u64,
    /// Bytes passed verbatim (stream headers, other records, device state, raw tail).
    pub verbatim_bytes: u64,
    /// Why the stream went raw, if it did before QEMU's end-of-RAM.
    pub fallback: Option<String>,
}

impl Stats {
    /// Bytes saved in all by zero sub-blocks, RE, delta, store and zstd.
    pub fn saved(&self) -> u64 {
        self.zero_saved + self.re_saved + self.delta_saved + self.store_saved + self.zstd_saved
    }
}
