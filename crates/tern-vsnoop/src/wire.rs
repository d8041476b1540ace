//! Wire helpers, pure functions: build the early ACK (IPv4 + TCP, checksums), parse an IPv4
//! TCP segment's headers into a [`Segment`] (checked; `None` on anything malformed), and
//! rewrite a VM ACK's ack/window fields in place with the TCP checksum fixed incrementally.

use std::net::Ipv4Addr;

use crate::{ACK, Options, Segment};

/// An ACK to emit on the VM's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSpec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Window field as sent (already shifted by the VM's scale).
    pub window: u16,
    /// (TSval, TSecr) when timestamps were negotiated.
    pub timestamps: Option<(u32, u32)>,
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        s += u32::from(w);
    }
    s
}

/// The early ACK as an IPv4 packet: DF, TTL 64, IP id 0; TCP with ACK only, and the
/// timestamps option (NOP NOP TS) when given. Both checksums filled.
pub fn build_ack(a: &AckSpec) -> Vec<u8> {
    let opt_len = if a.timestamps.is_some() { 12 } else { 0 };
    let tcp_len = 20 + opt_len;
    let total = 20 + tcp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&a.src.octets());
    p.extend_from_slice(&a.dst.octets());
    let ip_ck = !fold(sum16(&p[..20]));
    p[10..12].copy_from_slice(&ip_ck.to_be_bytes());
    p.extend_from_slice(&a.sport.to_be_bytes());
    p.extend_from_slice(&a.dport.to_be_bytes());
    p.extend_from_slice(&a.seq.to_be_bytes());
    p.extend_from_slice(&a.ack.to_be_bytes());
    p.push(((tcp_len / 4) as u8) << 4);
    p.push(ACK);
    p.extend_from_slice(&a.window.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    if let Some((tsval, tsecr)) = a.timestamps {
        p.extend_from_slice(&[1, 1, 8, 10]);
        p.extend_from_slice(&tsval.to_be_bytes());
        p.extend_from_slice(&tsecr.to_be_bytes());
    }
    let ck = !fold(pseudo(&p[12..20], tcp_len) + sum16(&p[20..]));
    p[36..38].copy_from_slice(&ck.to_be_bytes());
    p
}

fn pseudo(addrs: &[u8], tcp_len: usize) -> u32 {
    sum16(addrs) + 6 + tcp_len as u32
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_options(opts: &[u8]) -> Options {
    let mut o = Options::default();
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else {
                    o.unknown = true;
                    break;
                };
                let len = usize::from(len);
                let Some(body) = opts.get(i + 2..i + len.max(2)) else {
                    o.unknown = true;
                    break;
                };
                match (kind, len) {
                    (2, 4) => o.mss = be16(body, 0),
                    (3, 3) => o.wscale = Some(body[0]),
                    (4, 2) => o.sack_permitted = true,
                    (5, l) if l >= 10 && (l - 2) % 8 == 0 => o.sack = true,
                    (8, 10) => o.timestamps = be32(body, 0).zip(be32(body, 4)),
                    _ => o.unknown = true,
                }
                if len < 2 {
                    o.unknown = true;
                    break;
                }
                i += len;
            }
        }
    }
    o
}

/// Parse an IPv4 packet carrying TCP. `None` if not IPv4/TCP, fragmented or malformed.
pub fn parse_ipv4_tcp(p: &[u8]) -> Option<Segment> {
    if p.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(be16(p, 2)?);
    if ihl < 20 || total < ihl || total > p.len() || *p.get(9)? != 6 {
        return None;
    }
    if be16(p, 6)? & 0x3fff != 0 {
        return None; // MF or offset: fragments are passed through by the caller
    }
    let t = p.get(ihl..total)?;
    let doff = usize::from(*t.get(12)? >> 4) * 4;
    if doff < 20 || doff > t.len() {
        return None;
    }
    Some(Segment {
        src: Ipv4Addr::from(be32(p, 12)?),
        dst: Ipv4Addr::from(be32(p, 16)?),
        sport: be16(t, 0)?,
        dport: be16(t, 2)?,
        seq: be32(t, 4)?,
        ack: be32(t, 8)?,
        flags: t[13],
        window: be16(t, 14)?,
        payload_len: (t.len() - doff) as u32,
        options: parse_options(&t[20..doff]),
    })
}

/// Replace the ACK number and window of an IPv4 TCP packet in place, updating the TCP
/// checksum incrementally (RFC 1624). Returns `false` (packet untouched) if malformed.
pub fn rewrite_ack(p: &mut [u8], ack: u32, window: u16) -> bool {
    if parse_ipv4_tcp(p).is_none() {
        return false;
    }
    let t = usize::from(p[0] & 0x0f) * 4;
    let old: Vec<u8> = p[t + 8..t + 16].to_vec();
    p[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    p[t + 14..t + 16].copy_from_slice(&window.to_be_bytes());
    let ck = u16::from_be_bytes([p[t + 16], p[t + 17]]);
    // HC' = ~(~HC + ~m + m') over the changed 16-bit words.
    let mut s = u32::from(!ck);
    for i in (0..8).step_by(2) {
        let m = u16::from_be_bytes([old[i], old[i + 1]]);
        let m2 = u16::from_be_bytes([p[t + 8 + i], p[t + 9 + i]]);
        s += u32::from(!m) + u32::from(m2);
    }
    let new = !fold(s);
    p[t + 16..t + 18].copy_from_slice(&new.to_be_bytes());
    true
}
