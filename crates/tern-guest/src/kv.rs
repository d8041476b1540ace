//! A tiny transactional key-value service for disaster-recovery tests: `PUT <id>\n` writes
//! record `id` (512 bytes, [`record`]) at `id * 512` of a raw disk, makes it durable
//! (fdatasync), and only then answers `OK <id>\n` — the write-then-reply shape of a database
//! commit. A client that saw `OK n` may expect record `n` to survive any disaster.
//!
//! The front-end tier (`tern-guest --frontend HOST:7070 --calls K`) answers `PUT n` after
//! `K` sequential commits `PUT n*K+j` at the key-value service behind it ([`tier_ids`]): a
//! web request that makes several database transactions (PipeCloud's multi-tier case).

/// Bytes per record (one sector).
pub const RECORD_BYTES: usize = 512;
/// TCP port of the service.
pub const PORT: u16 = 7070;

/// The content of record `id`: a magic, the id, and a pattern derived from it.
pub fn record(id: u64) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[..8].copy_from_slice(b"TERNKV01");
    r[8..16].copy_from_slice(&id.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in r[16..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    r
}

/// Parses one request line: `PUT <id>`.
pub fn parse_put(line: &str) -> Option<u64> {
    let id = line.trim().strip_prefix("PUT ")?;
    id.trim().parse().ok()
}

/// The front-end tier's calls for client request `id` when each makes `calls` database
/// commits: records `id * calls .. id * calls + calls`.
pub fn tier_ids(id: u64, calls: u32) -> std::ops::Range<u64> {
    let c = u64::from(calls);
    id.saturating_mul(c)..id.saturating_mul(c).saturating_add(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_differ_and_requests_parse() {
        assert_ne!(record(1)[16..], record(2)[16..]);
        assert_eq!(&record(7)[8..16], &7u64.to_le_bytes());
        assert_eq!(parse_put("PUT 42\n"), Some(42));
        assert_eq!(parse_put("GET 42"), None);
        assert_eq!(parse_put("PUT x"), None);
        assert_eq!(tier_ids(3, 4), 12..16);
    }
}
