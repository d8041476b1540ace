//! Classic libpcap reading: both byte orders, µs (0xa1b2c3d4) and ns (0xa1b23c4d) magic.
//! Parsing is checked and bounded: any byte string gives `Ok` or a `PcapError`, never a panic.
//! A final record cut short (tcpdump killed mid-write) is counted, not an error.

use crate::packet::{self, TcpSegment};

/// Largest per-record captured length accepted. Larger `incl_len` values mean a corrupt file:
/// the parse stops with [`PcapError::RecordTooLarge`].
pub const MAX_RECORD_BYTES: u32 = 256 * 1024;

/// Most records read from one file. Beyond it the rest is skipped and counted in
/// [`Capture::records_skipped_over_limit`] (bounded memory on huge captures).
pub const MAX_RECORDS: usize = 20_000_000;

/// The link types understood (others: records are counted as non-TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LinkType {
    /// DLT_NULL / BSD loopback: 4-byte address family in the writer's byte order.
    Null,
    /// Ethernet II (with up to two 802.1Q tags).
    Ethernet,
    /// Raw IP (LINKTYPE_RAW 101, or 228 IPv4 / 229 IPv6). What tern's lab writes.
    RawIp,
    /// Linux cooked capture v1 (`tcpdump -i any`, 113).
    LinuxSll,
    /// Linux cooked capture v2 (276).
    LinuxSll2,
    Other(u32),
}

impl LinkType {
    fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Null,
            1 => Self::Ethernet,
            101 | 228 | 229 => Self::RawIp,
            113 => Self::LinuxSll,
            276 => Self::LinuxSll2,
            o => Self::Other(o),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    #[error("file too short for a pcap header ({len} bytes)")]
    ShortHeader { len: usize },
    #[error("pcapng files are not supported; convert with `editcap -F pcap`")]
    Pcapng,
    #[error("unknown pcap magic {magic:#010x}")]
    BadMagic { magic: u32 },
    #[error(
        "record at offset {offset} claims {incl_len} captured bytes (limit {MAX_RECORD_BYTES})"
    )]
    RecordTooLarge { offset: usize, incl_len: u32 },
}

/// One parsed file: its TCP segments in file order plus counts of what was not TCP.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capture {
    pub link: LinkType,
    pub nanosecond: bool,
    pub records: u64,
    pub tcp_segments: Vec<TcpSegment>,
    /// Records that were not IPv4/IPv6 TCP, or whose headers were cut by the snap length.
    pub records_not_tcp: u64,
    /// 1 if the last record was truncated by the end of the file.
    pub truncated_tail: u64,
    pub records_skipped_over_limit: u64,
}

fn rd_u32(b: &[u8], at: usize, le: bool) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(s)
    } else {
        u32::from_be_bytes(s)
    })
}

/// Parse a whole pcap file held in memory.
pub fn parse(bytes: &[u8]) -> Result<Capture, PcapError> {
    if bytes.len() >= 4 && bytes[..4] == [0x0a, 0x0d, 0x0d, 0x0a] {
        return Err(PcapError::Pcapng);
    }
    if bytes.len() < 24 {
        return Err(PcapError::ShortHeader { len: bytes.len() });
    }
    let magic_le = rd_u32(bytes, 0, true).unwrap_or(0);
    let (le, nanosecond) = match magic_le {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        magic => return Err(PcapError::BadMagic { magic }),
    };
    // Upper 16 bits may carry FCS info in newer writers; the link type is the low 16.
    let link_raw = rd_u32(bytes, 20, le).unwrap_or(0) & 0xffff;
    let link = LinkType::from_u32(link_raw);
    let mut cap = Capture {
        link,
        nanosecond,
        records: 0,
        tcp_segments: Vec::new(),
        records_not_tcp: 0,
        truncated_tail: 0,
        records_skipped_over_limit: 0,
    };
    let mut off = 24usize;
    while off < bytes.len() {
        if cap.records as usize >= MAX_RECORDS {
            cap.records_skipped_over_limit += 1;
            // Count the remaining records cheaply without decoding them.
            let Some(incl) = rd_u32(bytes, off + 8, le) else {
                break;
            };
            off = off.saturating_add(16).saturating_add(incl as usize);
            continue;
        }
        let (Some(sec), Some(frac), Some(incl_len), Some(_orig)) = (
            rd_u32(bytes, off, le),
            rd_u32(bytes, off + 4, le),
            rd_u32(bytes, off + 8, le),
            rd_u32(bytes, off + 12, le),
        ) else {
            cap.truncated_tail = 1;
            break;
        };
        if incl_len > MAX_RECORD_BYTES {
            return Err(PcapError::RecordTooLarge {
                offset: off,
                incl_len,
            });
        }
        let start = off + 16;
        let end = start + incl_len as usize;
        let Some(data) = bytes.get(start..end) else {
            cap.truncated_tail = 1;
            break;
        };
        cap.records += 1;
        let frac_ns = if nanosecond {
            u64::from(frac)
        } else {
            u64::from(frac).saturating_mul(1000)
        };
        let ts_ns = u64::from(sec)
            .saturating_mul(1_000_000_000)
            .saturating_add(frac_ns);
        match packet::decode(link, le, data, ts_ns) {
            Some(seg) => cap.tcp_segments.push(seg),
            None => cap.records_not_tcp += 1,
        }
        off = end;
    }
    Ok(cap)
}
