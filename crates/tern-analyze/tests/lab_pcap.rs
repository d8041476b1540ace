//! The lab's own pcap writer (tern-wan, `--pcap-dir`: raw IP, ns) is read correctly.

use tern_analyze::{LinkType, Params, analyze_pcap};
use tern_wan::PcapWriter;

fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, seq: u32, ack: u32, len: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&(40 + len).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sp.to_be_bytes());
    p.extend_from_slice(&dp.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend(std::iter::repeat_n(0u8, usize::from(len)));
    p
}

#[test]
fn lab_pcap_writer_output_is_understood() {
    let dir = std::env::temp_dir().join(format!("tern-analyze-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.ingress.pcap");
    // Snap length 96: payload cut, but lengths come from the IP header.
    let mut w = PcapWriter::create(&path, 96, 1 << 20).unwrap();
    let (a, b) = ([198, 18, 0, 1], [198, 18, 0, 2]);
    let t0 = 1_700_000_000_123_456_789u64;
    for i in 0..10u32 {
        let t = t0 + u64::from(i) * 200_000;
        w.record(t, &ipv4_tcp(a, b, 1, 2, 1 + i * 1400, 1, 1400))
            .unwrap();
        // ACKs at 0, 350, 400, 750, 800, ... µs: gaps alternate 350 and 50 µs.
        let ack_t = t + if i % 2 == 0 { 0 } else { 150_000 };
        w.record(ack_t, &ipv4_tcp(b, a, 2, 1, 1, 1 + (i + 1) * 1400, 0))
            .unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let (cap, an) = analyze_pcap(&bytes, &Params::default(), None).unwrap();
    assert_eq!(cap.link, LinkType::RawIp);
    assert!(cap.nanosecond);
    assert_eq!(cap.records, 20);
    let f = &an.flows[0];
    assert_eq!(f.data_bytes, 14_000);
    assert_eq!(f.acks, 10);
    // 9 gaps: 5 of 350 µs, 4 of 50 µs (< 120 µs).
    assert!((f.ack_compression_level.unwrap() - 4.0 / 9.0).abs() < 1e-12);
    assert_eq!(f.first_ts_ns, t0);
}
