//! Egress coalescing: consecutive TCP/IPv4 segments of one flow, or UDP/IPv4 datagrams of
//! one flow, released together by the model, are written to the output TUN as one GSO
//! super-packet (virtio-net header), so the receiving stack handles one large skb instead of
//! dozens — the same saving GRO gives a real NIC. The model still sees, drops, delays and
//! paces every packet individually; only the final write is merged, and only packets whose
//! headers would be identical after resegmentation (same flow, contiguous sequence numbers,
//! same options, equal sizes but the last).
//!
//! A UDP train (`GSO_UDP_L4`) reaches a socket with `UDP_GRO` enabled as one datagram buffer
//! plus its segment size; any other socket gets the datagrams one by one, as sent (the
//! kernel segments it on delivery).
//!
//! Every buffer carries a [`VNET_HDR_LEN`]-byte virtio-net header in front of the IP packet
//! (the TUN devices are opened with `IFF_VNET_HDR`). Pure functions; the driver does the I/O.

/// Size of `struct virtio_net_hdr` (no `num_buffers`), the TUN default.
pub const VNET_HDR_LEN: usize = 10;
/// Most segments merged into one write (and iovecs per `writev`).
pub const MAX_SEGMENTS: usize = 44;
/// Largest merged IP packet.
pub const MAX_MERGED_BYTES: usize = 65_000;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const UDP_HDR_LEN: usize = 28;

/// Header fields of a mergeable TCP/IPv4 segment or UDP/IPv4 datagram (no IP options, not a
/// fragment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    udp: bool,
    hdr_len: usize,
    payload_len: usize,
    seq: u32,
    flags: u8,
}

fn parse(pkt: &[u8]) -> Option<Seg> {
    if pkt.len() < UDP_HDR_LEN || pkt[0] != 0x45 || (pkt[9] != 6 && pkt[9] != 17) {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // MF set or a fragment offset: never merge.
    if total != pkt.len() || (u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff) != 0 {
        return None;
    }
    if pkt[9] == 17 {
        let udp_len = usize::from(u16::from_be_bytes([pkt[24], pkt[25]]));
        if udp_len != pkt.len() - 20 {
            return None;
        }
        return Some(Seg {
            udp: true,
            hdr_len: UDP_HDR_LEN,
            payload_len: pkt.len() - UDP_HDR_LEN,
            seq: 0,
            flags: 0,
        });
    }
    if pkt.len() < 40 {
        return None;
    }
    let thl = usize::from(pkt[32] >> 4) * 4;
    if thl < 20 || 20 + thl > pkt.len() {
        return None;
    }
    let flags = pkt[33];
    // Plain data segments only: ACK, optionally PSH; no SYN/FIN/RST/URG/ECE/CWR.
    if flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seq = u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]);
    Some(Seg {
        udp: false,
        hdr_len: 20 + thl,
        payload_len: pkt.len() - 20 - thl,
        seq,
        flags,
    })
}

/// True when `next` can follow `prev` (whose parsed form is `p`) in a merged packet whose
/// first segment is `first`.
fn follows(first: &[u8], f: &Seg, prev: &Seg, next: &[u8], n: &Seg) -> bool {
    let same_ip =
        first[0..2] == next[0..2] && first[6..10] == next[6..10] && first[12..20] == next[12..20];
    if f.udp {
        // UDP: same addresses and ports, full-size datagrams but the last.
        return n.udp
            && n.payload_len > 0
            && n.payload_len <= f.payload_len
            && prev.payload_len == f.payload_len
            && same_ip
            && first[20..24] == next[20..24];
    }
    !n.udp
        && n.hdr_len == f.hdr_len
        && n.payload_len > 0
        && n.payload_len <= f.payload_len
        && prev.payload_len == f.payload_len
        && prev.flags & TCP_PSH == 0
        && n.seq == prev.seq.wrapping_add(prev.payload_len as u32)
        // IP: version/IHL/TOS, flags+fragment, TTL, protocol, addresses.
        && same_ip
        // TCP: ports, ack, data offset, window, urgent pointer, options (flags compared apart).
        && first[20..24] == next[20..24]
        && first[28..33] == next[28..33]
        && first[34..36] == next[34..36]
        && first[38..f.hdr_len] == next[38..f.hdr_len]
}

/// Splits `packets` (IP packets, in delivery order) into runs to write together: each run
/// is a range of indices; a run longer than one is a mergeable TCP segment or UDP datagram
/// train of one flow.
pub fn plan(packets: &[&[u8]], runs: &mut Vec<std::ops::Range<usize>>) {
    runs.clear();
    let mut i = 0;
    while i < packets.len() {
        let mut j = i + 1;
        if let Some(f) = parse(packets[i]) {
            if f.payload_len > 0 {
                let mut prev = f;
                let mut bytes = packets[i].len();
                while j < packets.len() && j - i < MAX_SEGMENTS {
                    let Some(n) = parse(packets[j]) else { break };
                    if bytes + n.payload_len > MAX_MERGED_BYTES
                        || !follows(packets[i], &f, &prev, packets[j], &n)
                    {
                        break;
                    }
                    bytes += n.payload_len;
                    prev = n;
                    j += 1;
                }
            }
        }
        runs.push(i..j);
        i = j;
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Builds the virtio-net header and the merged IP+TCP or IP+UDP header for a run of
/// segments (`run.len() >= 2`): total length and IP checksum for the whole train, for TCP the
/// last segment's flags (PSH), for UDP the train's length, and in the transport checksum
/// field the pseudo-header sum the kernel completes (`NEEDS_CSUM`, as for any locally
/// generated GSO packet).
pub fn merged_headers(run: &[&[u8]], vnet: &mut [u8; VNET_HDR_LEN], headers: &mut Vec<u8>) {
    let first = run[0];
    let f = parse(first).expect("planned runs start with a TCP segment or UDP datagram");
    let last = parse(run[run.len() - 1]).expect("planned runs hold segments");
    let payload: usize = run.iter().map(|p| p.len() - f.hdr_len).sum();
    let total = f.hdr_len + payload;
    headers.clear();
    headers.extend_from_slice(&first[..f.hdr_len]);
    headers[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    headers[10..12].copy_from_slice(&[0, 0]);
    let ip_csum = !fold(sum16(&headers[..20]));
    headers[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let l4_len = (total - 20) as u32;
    let (proto, csum_at, gso_type) = if f.udp {
        headers[24..26].copy_from_slice(&(l4_len as u16).to_be_bytes());
        (17, 26, VIRTIO_NET_HDR_GSO_UDP_L4)
    } else {
        headers[33] = last.flags;
        (6, 36, VIRTIO_NET_HDR_GSO_TCPV4)
    };
    let pseudo = fold(sum16(&headers[12..20]) + proto + l4_len);
    headers[csum_at..csum_at + 2].copy_from_slice(&pseudo.to_be_bytes());
    vnet[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vnet[1] = gso_type;
    vnet[2..4].copy_from_slice(&(f.hdr_len as u16).to_le_bytes());
    vnet[4..6].copy_from_slice(&(f.payload_len as u16).to_le_bytes());
    vnet[6..8].copy_from_slice(&20u16.to_le_bytes());
    vnet[8..10].copy_from_slice(&((csum_at - 20) as u16).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 segment with valid checksums and a timestamp option.
    fn seg(seq: u32, payload: &[u8], flags: u8, tsval: u32) -> Vec<u8> {
        let thl = 32;
        let total = 20 + thl + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // IP id varies
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 1, 1]);
        p[16..20].copy_from_slice(&[198, 18, 2, 1]);
        let ip = !fold(sum16(&p[..20]));
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = ((thl / 4) as u8) << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..44].copy_from_slice(&[1, 1, 8, 10]);
        p[44..48].copy_from_slice(&tsval.to_be_bytes());
        p[20 + thl..].copy_from_slice(payload);
        let mut pseudo = sum16(&p[12..20]) + 6 + (total - 20) as u32;
        pseudo += sum16(&p[20..]);
        let tcp = !fold(pseudo);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    /// A UDP/IPv4 datagram from port `sport` with valid checksums.
    fn dgram(sport: u16, payload: &[u8]) -> Vec<u8> {
        let total = UDP_HDR_LEN + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 1, 1]);
        p[16..20].copy_from_slice(&[198, 18, 2, 1]);
        let ip = !fold(sum16(&p[..20]));
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&7400u16.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[UDP_HDR_LEN..].copy_from_slice(payload);
        let udp = !fold(sum16(&p[12..20]) + 17 + (total - 20) as u32 + sum16(&p[20..]));
        p[26..28].copy_from_slice(&udp.to_be_bytes());
        p
    }

    #[test]
    fn merges_a_udp_train_of_one_flow() {
        let full = vec![7u8; 1400];
        let pkts = vec![
            dgram(7400, &full),
            dgram(7400, &full),
            dgram(7400, &[9u8; 300]), // the last may be shorter
            dgram(7400, &full),       // but nothing follows a short one
            dgram(7401, &full),       // another flow
            dgram(7401, &full),
        ];
        assert_eq!(runs(&pkts), vec![0..3, 3..4, 4..6]);
        let refs: Vec<&[u8]> = pkts[..3].iter().map(|p| p.as_slice()).collect();
        let (mut vnet, mut hdr) = ([0u8; VNET_HDR_LEN], Vec::new());
        merged_headers(&refs, &mut vnet, &mut hdr);
        assert_eq!(hdr.len(), UDP_HDR_LEN);
        let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        assert_eq!(total, UDP_HDR_LEN + 3100);
        assert_eq!(u16::from_be_bytes([hdr[24], hdr[25]]) as usize, 8 + 3100);
        assert_eq!(fold(sum16(&hdr[..20])), 0xffff, "IP header checksum");
        assert_eq!(vnet[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(vnet[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_le_bytes([vnet[2], vnet[3]]), 28);
        assert_eq!(u16::from_le_bytes([vnet[4], vnet[5]]), 1400);
        assert_eq!(u16::from_le_bytes([vnet[8], vnet[9]]), 6);
        // Completing the partial checksum over the train gives a valid UDP checksum.
        let mut t = hdr.clone();
        for p in &refs {
            t.extend_from_slice(&p[UDP_HDR_LEN..]);
        }
        let partial = u32::from(u16::from_be_bytes([t[26], t[27]]));
        t[26..28].copy_from_slice(&[0, 0]);
        let csum = !fold(partial + sum16(&t[20..]));
        t[26..28].copy_from_slice(&csum.to_be_bytes());
        let check = fold(sum16(&t[12..20]) + 17 + (total - 20) as u32 + sum16(&t[20..]));
        assert_eq!(check, 0xffff, "UDP checksum");
        // A datagram whose UDP length disagrees with the IP length is left alone.
        let mut bad = dgram(7400, &full);
        bad[25] ^= 1;
        assert_eq!(runs(&[dgram(7400, &full), bad]), vec![0..1, 1..2]);
    }

    fn runs(pkts: &[Vec<u8>]) -> Vec<std::ops::Range<usize>> {
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let mut r = Vec::new();
        plan(&refs, &mut r);
        r
    }

    #[test]
    fn merges_a_contiguous_train_and_rebuilds_headers() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut pkts = Vec::new();
        let mut seq = 1000u32;
        for (k, chunk) in body.chunks(1448).enumerate() {
            let flags = if k == 3 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            pkts.push(seg(seq, chunk, flags, 9));
            seq += chunk.len() as u32;
        }
        assert_eq!(runs(&pkts), vec![0..4]);
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        let (mut vnet, mut hdr) = ([0u8; VNET_HDR_LEN], Vec::new());
        merged_headers(&refs, &mut vnet, &mut hdr);
        assert_eq!(hdr.len(), 52);
        let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        assert_eq!(total, 52 + 5000);
        assert_eq!(fold(sum16(&hdr[..20])), 0xffff, "IP header checksum");
        assert_eq!(hdr[33], TCP_ACK | TCP_PSH);
        assert_eq!(u16::from_le_bytes([vnet[4], vnet[5]]), 1448);
        assert_eq!(u16::from_le_bytes([vnet[2], vnet[3]]), 52);
        // Completing the partial checksum over header + payload gives a valid TCP checksum.
        let mut whole = hdr.clone();
        for p in &refs {
            whole.extend_from_slice(&p[52..]);
        }
        assert_eq!(&whole[52..], &body[..]);
        let partial = u32::from(u16::from_be_bytes([whole[36], whole[37]]));
        let mut t = whole.clone();
        t[36..38].copy_from_slice(&[0, 0]);
        let csum = !fold(partial + sum16(&t[20..]));
        t[36..38].copy_from_slice(&csum.to_be_bytes());
        let check = fold(sum16(&t[12..20]) + 6 + (total - 20) as u32 + sum16(&t[20..]));
        assert_eq!(check, 0xffff, "TCP checksum");
    }

    #[test]
    fn breaks_runs_where_resegmentation_would_differ() {
        let p = |seq, len: usize, flags, ts| seg(seq, &vec![1u8; len], flags, ts);
        // Gap in sequence numbers.
        assert_eq!(
            runs(&[p(0, 100, TCP_ACK, 1), p(200, 100, TCP_ACK, 1)]),
            vec![0..1, 1..2]
        );
        // Different timestamp option.
        assert_eq!(
            runs(&[p(0, 100, TCP_ACK, 1), p(100, 100, TCP_ACK, 2)]),
            vec![0..1, 1..2]
        );
        // A short segment ends a run; PSH ends a run.
        assert_eq!(
            runs(&[
                p(0, 100, TCP_ACK, 1),
                p(100, 50, TCP_ACK, 1),
                p(150, 100, TCP_ACK, 1)
            ]),
            vec![0..2, 2..3]
        );
        assert_eq!(
            runs(&[p(0, 100, TCP_ACK | TCP_PSH, 1), p(100, 100, TCP_ACK, 1)]),
            vec![0..1, 1..2]
        );
        // FIN, pure ACKs and non-TCP are never merged.
        assert_eq!(
            runs(&[p(0, 100, TCP_ACK | 1, 1), p(100, 100, TCP_ACK, 1)]),
            vec![0..1, 1..2]
        );
        assert_eq!(
            runs(&[p(0, 0, TCP_ACK, 1), p(0, 0, TCP_ACK, 1)]),
            vec![0..1, 1..2]
        );
        // A TCP segment and a UDP datagram never share a run.
        assert_eq!(
            runs(&[p(0, 100, TCP_ACK, 1), dgram(5000, &[1u8; 100])]),
            vec![0..1, 1..2]
        );
        // Garbage does not panic.
        assert_eq!(runs(&[vec![0x45; 3], vec![]]), vec![0..1, 1..2]);
    }

    #[test]
    fn caps_segments_and_bytes() {
        let pkts: Vec<Vec<u8>> = (0..100u32)
            .map(|k| seg(k * 1448, &[0u8; 1448], TCP_ACK, 1))
            .collect();
        let r = runs(&pkts);
        assert!(r.iter().all(|x| x.len() <= MAX_SEGMENTS));
        assert!(r.iter().all(|x| x.len() * 1448 + 52 <= MAX_MERGED_BYTES));
        assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), 100);
    }
}
