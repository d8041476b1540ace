//! Synthetic pcaps with known answers, written by a small pcap writer here.

use tern_analyze::{LinkType, Params, PcapError, analyze_pcap, parse};

const SND: [u8; 4] = [198, 18, 0, 1];
const RCV: [u8; 4] = [198, 18, 0, 2];
const SPORT: u16 = 40000;
const DPORT: u16 = 5201;
const MSS: u32 = 1460;

#[derive(Clone, Copy)]
enum Link {
    Raw,
    Ether,
    Sll,
    Sll2,
}

struct Writer {
    le: bool,
    ns: bool,
    link: Link,
    buf: Vec<u8>,
}

impl Writer {
    fn new(le: bool, ns: bool, link: Link) -> Self {
        let mut w = Self {
            le,
            ns,
            link,
            buf: Vec::new(),
        };
        let magic: u32 = if ns { 0xa1b2_3c4d } else { 0xa1b2_c3d4 };
        let lt = match link {
            Link::Raw => 101,
            Link::Ether => 1,
            Link::Sll => 113,
            Link::Sll2 => 276,
        };
        w.u32(magic);
        w.u16(2);
        w.u16(4);
        w.u32(0);
        w.u32(0);
        w.u32(65535);
        w.u32(lt);
        w
    }
    fn u32(&mut self, v: u32) {
        let b = if self.le {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        };
        self.buf.extend_from_slice(&b);
    }
    fn u16(&mut self, v: u16) {
        let b = if self.le {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        };
        self.buf.extend_from_slice(&b);
    }
    /// A TCP segment; `snap` limits the captured payload bytes (IP length stays full).
    #[allow(clippy::too_many_arguments)]
    fn tcp(&mut self, ts_ns: u64, fwd: bool, seq: u32, ack: u32, flags: u8, payload: u32) {
        let (src, dst, sp, dp) = if fwd {
            (SND, RCV, SPORT, DPORT)
        } else {
            (RCV, SND, DPORT, SPORT)
        };
        let mut ip = Vec::new();
        let total = 20 + 20 + payload as u16;
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&sp.to_be_bytes());
        ip.extend_from_slice(&dp.to_be_bytes());
        ip.extend_from_slice(&seq.to_be_bytes());
        ip.extend_from_slice(&ack.to_be_bytes());
        ip.extend_from_slice(&[0x50, flags]);
        ip.extend_from_slice(&65535u16.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0]);
        // Captured with a 64-byte-ish snap: headers plus at most 8 payload bytes.
        ip.extend(std::iter::repeat_n(0xab, payload.min(8) as usize));
        let mut frame = Vec::new();
        match self.link {
            Link::Raw => {}
            Link::Ether => {
                frame.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
                frame.extend_from_slice(&[0x81, 0x00, 0, 7]); // one VLAN tag
                frame.extend_from_slice(&[0x08, 0x00]);
            }
            Link::Sll => {
                frame.extend_from_slice(&[0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
                frame.extend_from_slice(&[0x08, 0x00]);
            }
            Link::Sll2 => {
                frame.extend_from_slice(&[0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6]);
                frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0, 0]);
            }
        }
        frame.extend_from_slice(&ip);
        let sec = (ts_ns / 1_000_000_000) as u32;
        let frac = if self.ns {
            (ts_ns % 1_000_000_000) as u32
        } else {
            ((ts_ns % 1_000_000_000) / 1000) as u32
        };
        self.u32(sec);
        self.u32(frac);
        self.u32(frame.len() as u32);
        self.u32(frame.len() as u32 + payload.saturating_sub(8));
        self.buf.extend_from_slice(&frame);
    }
}

const SYN: u8 = 0x02;
const ACKF: u8 = 0x10;

/// A flow with a known ACK stream: handshake, then `gaps_ns` between consecutive pure ACKs,
/// each ACK covering two MSS; every data segment sent just before its ACK; `rtx` extra
/// retransmitted segments.
fn known_flow(w: &mut Writer, isn: u32, gaps_ns: &[u64], rtx: usize) -> u64 {
    let t0 = 1_700_000_000_000_000_000u64;
    let irs = 7777u32;
    w.tcp(t0, true, isn, 0, SYN, 0);
    w.tcp(t0 + 10_000, false, irs, isn.wrapping_add(1), SYN | ACKF, 0);
    w.tcp(t0 + 20_000, true, isn.wrapping_add(1), irs + 1, ACKF, 0);
    let mut t = t0 + 1_000_000;
    let mut next = isn.wrapping_add(1);
    for (i, &g) in std::iter::once(&0u64).chain(gaps_ns).enumerate() {
        t += g;
        for _ in 0..2 {
            w.tcp(t - 1000, true, next, irs + 1, ACKF, MSS);
            next = next.wrapping_add(MSS);
        }
        if i < rtx {
            // Resend the first of the two.
            w.tcp(
                t - 500,
                true,
                next.wrapping_sub(2 * MSS),
                irs + 1,
                ACKF,
                MSS,
            );
        }
        w.tcp(t, false, irs + 1, next, ACKF, 0);
    }
    t
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn compression_level_and_histogram_have_known_values() {
    // 20 gaps of 50 µs (compressed), 60 of 240 µs, 20 of 360 µs: C = 20/100.
    let mut gaps = vec![50_000u64; 20];
    gaps.extend(vec![240_000; 60]);
    gaps.extend(vec![360_000; 20]);
    let mut w = Writer::new(true, true, Link::Raw);
    known_flow(&mut w, 1000, &gaps, 3);
    let (cap, a) = analyze_pcap(&w.buf, &Params::default(), None).unwrap();
    assert_eq!(cap.link, LinkType::RawIp);
    assert_eq!(a.flows.len(), 1);
    let f = &a.flows[0];
    assert_eq!(f.sender, "198.18.0.1:40000");
    assert_eq!(f.acks, 101);
    assert_eq!(f.inter_arrivals, 100);
    assert!(approx(f.ack_compression_level.unwrap(), 0.20));
    // 5 µs bins: 50 µs → bin 10, 240 → 48, 360 → 72.
    assert!(approx(f.histogram.percent[10], 20.0));
    assert!(approx(f.histogram.percent[48], 60.0));
    assert!(approx(f.histogram.percent[72], 20.0));
    assert_eq!(f.histogram.modes_ms[0], 0.24);
    // Mass near multiples of T_pkt: 0.24 ms (k=2) 60%, 0.36 ms (k=3) 20%, 0.12 ms none.
    let m = &f.histogram.mass_near_multiples;
    assert!(approx(m[0].1, 0.0) && approx(m[1].1, 60.0) && approx(m[2].1, 20.0));
    assert!(approx(m[1].0, 0.24));
    // CDF at T_pkt (last point) equals the level; at 0.05 ms nothing is strictly below.
    let last = f.compression_cdf.last().unwrap();
    assert!(approx(last.0, 0.12) && approx(last.1, 0.20));
    assert!(approx(f.compression_cdf[10].1, 0.0));
    assert!(approx(f.compression_cdf[11].1, 0.20));
    // Data: 101 ACKs × 2 segments, plus 3 retransmissions.
    assert_eq!(f.data_segments, 205);
    assert_eq!(f.retransmitted_segments, 3);
    assert!(approx(f.retransmission_rate, 3.0 / 205.0));
    assert_eq!(f.duplicate_acks, 0);
    // ρ for a 2920-byte ACK at 100 Mb/s: ideal 233.6 µs; 50 µs gives ρ ≈ 0.214 < 0.5.
    assert!(approx(f.rho_below_half.unwrap(), 0.20));
}

#[test]
fn every_link_type_byte_order_and_resolution_give_the_same_answer() {
    let gaps: Vec<u64> = (0..50).map(|i| 30_000 + i * 7_000).collect();
    let mut reference = None;
    for le in [true, false] {
        for ns in [true, false] {
            for link in [Link::Raw, Link::Ether, Link::Sll, Link::Sll2] {
                let mut w = Writer::new(le, ns, link);
                known_flow(&mut w, 5, &gaps, 0);
                let (cap, a) = analyze_pcap(&w.buf, &Params::default(), None).unwrap();
                assert_eq!(cap.records_not_tcp, 0);
                assert_eq!(cap.nanosecond, ns);
                let f = &a.flows[0];
                let got = (f.acks, f.ack_compression_level, f.data_bytes);
                // 30..120 µs step 7: 30,37,...,114 are < 120: 13 of 50.
                assert!(approx(f.ack_compression_level.unwrap(), 13.0 / 50.0));
                match &reference {
                    None => reference = Some(got),
                    Some(r) => assert_eq!(r, &got),
                }
            }
        }
    }
}

#[test]
fn sequence_wraparound_is_not_a_retransmission() {
    let gaps = vec![240_000u64; 40];
    let mut w = Writer::new(true, true, Link::Raw);
    // ISN just below 2^32: the stream wraps after a few segments.
    known_flow(&mut w, u32::MAX - 5000, &gaps, 0);
    let (_, a) = analyze_pcap(&w.buf, &Params::default(), None).unwrap();
    let f = &a.flows[0];
    assert_eq!(f.retransmitted_segments, 0);
    assert_eq!(f.duplicate_acks, 0);
    assert_eq!(f.data_bytes, 41 * 2 * u64::from(MSS));
}

#[test]
fn burstiness_is_sigma_over_mu_with_empty_intervals() {
    // ACKs (each 2920 B) at 0 ms, 130 ms, 131 ms: 60 ms intervals hold 2920+first, 0, 5840.
    // The first ACK acks the first 2 segments (2920 B), aligned at t0.
    let mut w = Writer::new(true, true, Link::Raw);
    known_flow(&mut w, 1, &[130_000_000, 1_000_000], 0);
    let (_, a) = analyze_pcap(&w.buf, &Params::default(), None).unwrap();
    let b = &a.flows[0].burstiness;
    assert_eq!(b.intervals, 3);
    let t = [2920.0f64, 0.0, 5840.0];
    let mean = t.iter().sum::<f64>() / 3.0;
    let std = (t.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
    assert!((b.mean_bytes - mean).abs() < 1e-6);
    assert!((b.sigma_over_mu.unwrap() - std / mean).abs() < 1e-9);
    assert!((b.mu_over_sigma_as_printed.unwrap() - mean / std).abs() < 1e-9);
    let short = &a.flows[0].throughput_short_mbps;
    assert!((short[2] - 5840.0 * 8.0 / 0.06 / 1e6).abs() < 1e-9);
}

#[test]
fn flow_filter_selects_by_label() {
    let mut w = Writer::new(true, true, Link::Raw);
    known_flow(&mut w, 1, &[240_000; 3], 0);
    let p = Params::default();
    assert_eq!(
        analyze_pcap(&w.buf, &p, Some(":5201"))
            .unwrap()
            .1
            .flows
            .len(),
        1
    );
    assert_eq!(
        analyze_pcap(&w.buf, &p, Some(":9999"))
            .unwrap()
            .1
            .flows
            .len(),
        0
    );
}

#[test]
fn bad_headers_are_errors_not_panics() {
    assert!(matches!(parse(&[]), Err(PcapError::ShortHeader { len: 0 })));
    assert!(matches!(
        parse(&[0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0]),
        Err(PcapError::Pcapng)
    ));
    assert!(matches!(parse(&[0u8; 24]), Err(PcapError::BadMagic { .. })));
    let mut w = Writer::new(true, true, Link::Raw);
    w.u32(0);
    w.u32(0);
    w.u32(u32::MAX);
    w.u32(0);
    assert!(matches!(
        parse(&w.buf),
        Err(PcapError::RecordTooLarge { .. })
    ));
}

/// Deterministic fuzz: every prefix and many seeded mutations of a valid file parse or fail
/// cleanly, and analysing whatever parsed does not panic.
#[test]
fn truncations_and_mutations_never_panic() {
    let mut w = Writer::new(false, false, Link::Ether);
    known_flow(&mut w, 9, &[50_000, 240_000, 1_000, 7_000_000], 1);
    let good = w.buf.clone();
    let p = Params::default();
    for cut in 0..good.len() {
        if let Ok(c) = parse(&good[..cut]) {
            let _ = tern_analyze::analyze(&c.tcp_segments, &p, None);
        }
    }
    let full = parse(&good).unwrap();
    assert_eq!(full.truncated_tail, 0);
    assert_eq!(parse(&good[..good.len() - 3]).unwrap().truncated_tail, 1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut m = good.clone();
        for _ in 0..(1 + rnd() % 6) {
            let i = (rnd() as usize) % m.len();
            m[i] = rnd() as u8;
        }
        if let Ok(c) = parse(&m) {
            let _ = tern_analyze::analyze(&c.tcp_segments, &p, None);
        }
    }
}

/// A real capture: `tcpdump -i lo -s 128` of `iperf3 -c 127.0.0.1 -t 2 -b 200M` (Ethernet
/// link type, µs timestamps), first 400 records. Expected values computed independently with
/// tcpdump filters (pure ACKs 5299→49048: 152, of 151 gaps 83 below 120 µs; 231 data segments
/// carrying 10,289,136 bytes from 49048; iperf3 reported 0 retransmissions).
#[test]
fn real_iperf3_capture_matches_tcpdump() {
    let bytes = include_bytes!("data/iperf3-lo.pcap");
    let (cap, a) = analyze_pcap(bytes, &Params::default(), Some(":49048")).unwrap();
    assert_eq!(cap.link, LinkType::Ethernet);
    assert!(!cap.nanosecond);
    assert_eq!(cap.records, 400);
    let f = &a.flows[0];
    assert_eq!(f.sender, "127.0.0.1:49048");
    assert_eq!(f.acks, 152);
    assert_eq!(f.inter_arrivals, 151);
    assert!(approx(f.ack_compression_level.unwrap(), 83.0 / 151.0));
    assert_eq!(f.data_segments, 231);
    assert_eq!(f.data_bytes, 10_289_136);
    assert_eq!(f.retransmitted_segments, 0);
}

#[test]
fn ks_distance_has_known_values() {
    use tern_analyze::ks_distance;
    assert_eq!(ks_distance(&[1, 2, 3], &[1, 2, 3]), Some(0.0));
    assert_eq!(ks_distance(&[1, 2], &[3, 4]), Some(1.0));
    // F_a jumps to 0.5 at 1; F_b is 0 until 2: sup 0.5.
    assert_eq!(ks_distance(&[1, 3], &[2, 3]), Some(0.5));
    assert_eq!(ks_distance(&[], &[1]), None);
}
