//! Link → IPv4/IPv6 → TCP header decoding with checked slicing (returns `None` on anything
//! malformed or not TCP; never panics). Only headers are needed: the payload length comes from
//! the IP length field, so snap-length-truncated captures still count bytes correctly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::pcap::LinkType;

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Most IPv6 extension headers walked before giving up on a packet.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// One TCP segment's header fields as seen at the capture point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TcpSegment {
    pub ts_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Payload bytes per the IP length (not the captured length).
    pub payload_len: u32,
    /// The segment carried a SACK option.
    pub sack: bool,
}

impl TcpSegment {
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Decode one record's bytes.
pub fn decode(link: LinkType, file_le: bool, data: &[u8], ts_ns: u64) -> Option<TcpSegment> {
    let ip = match link {
        LinkType::RawIp => data,
        LinkType::Ethernet => {
            let mut at = 12;
            let mut et = be16(data, at)?;
            let mut tags = 0;
            while (et == 0x8100 || et == 0x88a8) && tags < 2 {
                at += 4;
                et = be16(data, at)?;
                tags += 1;
            }
            if et != 0x0800 && et != 0x86dd {
                return None;
            }
            data.get(at + 2..)?
        }
        LinkType::LinuxSll => {
            let et = be16(data, 14)?;
            if et != 0x0800 && et != 0x86dd {
                return None;
            }
            data.get(16..)?
        }
        LinkType::LinuxSll2 => {
            let et = be16(data, 0)?;
            if et != 0x0800 && et != 0x86dd {
                return None;
            }
            data.get(20..)?
        }
        LinkType::Null => {
            let fam: [u8; 4] = data.get(..4)?.try_into().ok()?;
            let fam = if file_le {
                u32::from_le_bytes(fam)
            } else {
                u32::from_be_bytes(fam)
            };
            // AF_INET is 2 everywhere; AF_INET6 is 10/24/28/30 depending on the OS.
            if ![2, 10, 24, 28, 30].contains(&fam) {
                return None;
            }
            data.get(4..)?
        }
        LinkType::Other(_) => return None,
    };
    decode_ip(ip, ts_ns)
}

fn decode_ip(ip: &[u8], ts_ns: u64) -> Option<TcpSegment> {
    let version = ip.first()? >> 4;
    let (src, dst, tcp, l4_len) = match version {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let total = usize::from(be16(ip, 2)?);
            let frag = be16(ip, 6)?;
            // Non-first fragments carry no TCP header.
            if frag & 0x1fff != 0 || *ip.get(9)? != 6 || total < ihl {
                return None;
            }
            let src = Ipv4Addr::from(be32(ip, 12)?);
            let dst = Ipv4Addr::from(be32(ip, 16)?);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                ip.get(ihl..)?,
                total - ihl,
            )
        }
        6 => {
            let payload = usize::from(be16(ip, 4)?);
            let mut next = *ip.get(6)?;
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let mut at = 40usize;
            let mut hops = 0;
            // Hop-by-hop, routing, destination options.
            while matches!(next, 0 | 43 | 60) {
                hops += 1;
                if hops > MAX_IPV6_EXT_HEADERS {
                    return None;
                }
                next = *ip.get(at)?;
                at += (usize::from(*ip.get(at + 1)?) + 1) * 8;
            }
            if next != 6 {
                return None;
            }
            let l4 = payload.checked_sub(at - 40)?;
            (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                ip.get(at..)?,
                l4,
            )
        }
        _ => return None,
    };
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    if doff < 20 || l4_len < doff {
        return None;
    }
    let mut sack = false;
    if let Some(opts) = tcp.get(20..doff) {
        let mut i = 0;
        while i < opts.len() {
            match opts[i] {
                0 => break,
                1 => i += 1,
                kind => {
                    let Some(&len) = opts.get(i + 1) else { break };
                    if len < 2 {
                        break;
                    }
                    if kind == 5 {
                        sack = true;
                    }
                    i += usize::from(len);
                }
            }
        }
    }
    Some(TcpSegment {
        ts_ns,
        src,
        dst,
        sport: be16(tcp, 0)?,
        dport: be16(tcp, 2)?,
        seq: be32(tcp, 4)?,
        ack: be32(tcp, 8)?,
        flags: *tcp.get(13)?,
        window: be16(tcp, 14)?,
        payload_len: u32::try_from(l4_len - doff).ok()?,
        sack,
    })
}
