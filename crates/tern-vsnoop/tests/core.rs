//! State-machine unit tests and golden bytes for the early ACK.

use std::net::Ipv4Addr;

use tern_vsnoop::{
    ACK, AckSpec, FIN, Forward, FromVm, Options, PassReason, RST, SYN, Segment, State, Vsnoop,
    build_ack, parse_ipv4_tcp, rewrite_ack,
};

const S: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const V: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const ISN: u32 = 1_000_000;
const VISN: u32 = 5_000_000;
const BIG: u64 = 1 << 20;

fn seg(to_vm: bool, seq: u32, ack: u32, flags: u8, len: u32, window: u16) -> Segment {
    let (src, dst, sport, dport) = if to_vm {
        (S, V, 40000, 80)
    } else {
        (V, S, 80, 40000)
    };
    Segment {
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        payload_len: len,
        options: Options::default(),
    }
}

/// Handshake with window scaling 2 on the VM side (and `ts` timestamps if asked).
fn established(ts: bool) -> Vsnoop {
    let mut v = Vsnoop::new();
    let mut syn = seg(true, ISN, 0, SYN, 0, 65535);
    syn.options.wscale = Some(7);
    syn.options.sack_permitted = true;
    if ts {
        syn.options.timestamps = Some((100, 0));
    }
    assert!(v.handle_segment_to_vm(0, &syn, BIG).early_ack.is_none());
    let mut sa = seg(false, VISN, ISN + 1, SYN | ACK, 0, 16384);
    sa.options.wscale = Some(2);
    sa.options.sack_permitted = true;
    if ts {
        sa.options.timestamps = Some((9000, 100));
    }
    assert_eq!(v.handle_segment_from_vm(0, &sa), FromVm::Forward);
    // The VM opens its window to 64 KiB (scaled).
    let w = seg(false, VISN + 1, ISN + 1, ACK, 0, 16384);
    assert_eq!(v.handle_segment_from_vm(1, &w), FromVm::Forward);
    v
}

fn key() -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    ((S, 40000), (V, 80))
}

#[test]
fn in_order_segment_is_acked_early_with_the_vms_right_edge() {
    let mut v = established(false);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    let a = v.handle_segment_to_vm(10, &d, BIG);
    assert_eq!(a.forward, Forward::Reserved);
    let e = a.early_ack.expect("early ack");
    assert_eq!((e.src, e.dst, e.sport, e.dport), (V, S, 80, 40000));
    assert_eq!(e.seq, VISN + 1);
    assert_eq!(e.ack, ISN + 1001);
    // Right edge ISN+1+65536; (65536-1000)>>2.
    assert_eq!(e.window, ((65536 - 1000) >> 2) as u16);
    assert_eq!(v.undelivered_bytes(), 1000);
}

#[test]
fn syn_fin_rst_and_out_of_order_are_never_acked_early() {
    let mut v = established(false);
    let hole = seg(true, ISN + 1001, VISN + 1, ACK, 1000, 512);
    assert!(v.handle_segment_to_vm(10, &hole, BIG).early_ack.is_none());
    let (snd, vm) = key();
    assert_eq!(v.state(snd, vm), Some(State::OutOfOrder));
    // The hole is filled: everything before it is acked by the VM (none), so it may be acked.
    let fill = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    let a = v.handle_segment_to_vm(11, &fill, BIG);
    assert_eq!(a.early_ack.map(|e| e.ack), Some(ISN + 1001));
    let fin = seg(true, ISN + 2001, VISN + 1, FIN | ACK, 0, 512);
    assert!(v.handle_segment_to_vm(12, &fin, BIG).early_ack.is_none());
    assert_eq!(v.state(snd, vm), Some(State::Passthrough(PassReason::Fin)));
    let rst = seg(true, ISN + 2002, 0, RST, 0, 0);
    assert!(v.handle_segment_to_vm(13, &rst, BIG).early_ack.is_none());
    assert_eq!(v.state(snd, vm), None);
    assert_eq!(v.counters().dropped_undelivered_bytes, 1000);
}

#[test]
fn no_budget_or_no_vm_window_means_no_early_ack() {
    let mut v = established(false);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    let a = v.handle_segment_to_vm(10, &d, 999);
    assert_eq!(a.forward, Forward::Unreserved);
    assert!(a.early_ack.is_none());
    // Next in-order segment has budget but follows an unguaranteed byte.
    let d2 = seg(true, ISN + 1001, VISN + 1, ACK, 1000, 512);
    assert!(v.handle_segment_to_vm(11, &d2, BIG).early_ack.is_none());
    // The VM catches up: the next one is acked early again.
    let va = seg(false, VISN + 1, ISN + 2001, ACK, 0, 16384);
    assert_eq!(v.handle_segment_from_vm(12, &va), FromVm::Forward);
    let d3 = seg(true, ISN + 2001, VISN + 1, ACK, 1000, 512);
    assert!(v.handle_segment_to_vm(13, &d3, BIG).early_ack.is_some());
    // Beyond the VM's right edge (ISN+2001+65536): no early ACK.
    let far = seg(true, ISN + 3001, VISN + 1, ACK, 65536, 512);
    assert!(v.handle_segment_to_vm(14, &far, BIG).early_ack.is_none());
    let c = v.counters();
    assert_eq!(
        (c.no_buffer_budget, c.no_vm_window, c.early_acks),
        (1, 1, 1)
    );
}

#[test]
fn vm_duplicate_acks_are_suppressed_and_window_updates_rewritten() {
    let mut v = established(false);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    v.handle_segment_to_vm(10, &d, BIG);
    // The VM's own ACK of the same byte, window unchanged in right-edge terms: suppressed.
    let same = seg(
        false,
        VISN + 1,
        ISN + 1001,
        ACK,
        0,
        ((65536 - 1000) >> 2) as u16,
    );
    assert_eq!(v.handle_segment_from_vm(11, &same), FromVm::Suppress);
    // An older ACK from the VM: suppressed too (the sender must not see it go backwards).
    let old = seg(false, VISN + 1, ISN + 1, ACK, 0, 16384);
    assert_eq!(v.handle_segment_from_vm(12, &old), FromVm::Suppress);
    // The VM's window grows (right edge moves): a window update the sender needs.
    let grow = seg(false, VISN + 1, ISN + 1001, ACK, 0, 20000);
    assert_eq!(v.handle_segment_from_vm(13, &grow), FromVm::Forward);
    // An old ACK carrying a window update: rewritten up to the early-acked point, with the
    // window recomputed from the VM's right edge (ISN+1+100000).
    let old_grow = seg(false, VISN + 1, ISN + 1, ACK, 0, 25000);
    assert_eq!(
        v.handle_segment_from_vm(13, &old_grow),
        FromVm::Rewrite {
            ack: ISN + 1001,
            window: ((100_000 - 1000) >> 2) as u16
        }
    );
    // Data from the VM with an old ACK: rewritten, never suppressed.
    let mut data = seg(false, VISN + 1, ISN + 1, ACK, 100, 20000);
    data.payload_len = 100;
    assert!(matches!(
        v.handle_segment_from_vm(14, &data),
        FromVm::Rewrite { ack, .. } if ack == ISN + 1001
    ));
    assert_eq!(v.undelivered_bytes(), 0);
}

#[test]
fn fallbacks_are_per_flow_and_counted() {
    // Unknown option on a data segment.
    let mut v = established(false);
    let mut d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    d.options.unknown = true;
    assert!(v.handle_segment_to_vm(10, &d, BIG).early_ack.is_none());
    let (snd, vm) = key();
    assert_eq!(
        v.state(snd, vm),
        Some(State::Passthrough(PassReason::UnknownOption))
    );
    assert_eq!(v.counters().fallback_unknown_option, 1);
    // Window shrink.
    let mut v = established(false);
    let shrink = seg(false, VISN + 1, ISN + 1, ACK, 0, 100);
    v.handle_segment_from_vm(10, &shrink);
    assert_eq!(
        v.state(snd, vm),
        Some(State::Passthrough(PassReason::WindowShrink))
    );
    let d = seg(true, ISN + 1, VISN + 1, ACK, 100, 512);
    assert!(v.handle_segment_to_vm(11, &d, BIG).early_ack.is_none());
    // SACK from the VM.
    let mut v = established(false);
    let mut s = seg(false, VISN + 1, ISN + 1, ACK, 0, 16384);
    s.options.sack = true;
    assert_eq!(v.handle_segment_from_vm(10, &s), FromVm::Forward);
    assert_eq!(
        v.state(snd, vm),
        Some(State::Passthrough(PassReason::SackFromVm))
    );
    // Timestamps negotiated but missing on a data segment.
    let mut v = established(true);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 100, 512);
    assert!(v.handle_segment_to_vm(10, &d, BIG).early_ack.is_none());
    assert_eq!(v.counters().fallback_missing_timestamp, 1);
    // A flow first seen mid-connection is never tracked.
    let mut v = Vsnoop::new();
    let d = seg(true, ISN + 1, VISN + 1, ACK, 100, 512);
    assert!(v.handle_segment_to_vm(10, &d, BIG).early_ack.is_none());
    assert_eq!(v.counters().untracked_segments, 1);
    assert_eq!(v.flow_count(), 0);
}

#[test]
fn timestamps_echo_the_senders_tsval_and_copy_the_vms() {
    let mut v = established(true);
    let mut d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    d.options.timestamps = Some((4242, 9000));
    let e = v.handle_segment_to_vm(10, &d, BIG).early_ack.unwrap();
    assert_eq!(e.timestamps, Some((9000, 4242)));
}

#[test]
fn quiesce_stops_early_acks_and_drop_reports_what_is_owed() {
    let mut v = established(false);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1000, 512);
    v.handle_segment_to_vm(10, &d, BIG);
    assert_eq!(v.quiesce(), 1000);
    let d2 = seg(true, ISN + 1001, VISN + 1, ACK, 1000, 512);
    assert!(v.handle_segment_to_vm(11, &d2, BIG).early_ack.is_none());
    let r = v.drop_state();
    assert_eq!((r.flows, r.undelivered_bytes), (1, 1000));
    assert_eq!(v.flow_count(), 0);
}

#[test]
fn idle_flows_are_collected() {
    let mut v = established(false);
    assert_eq!(v.poll_timeout(), Some(1 + tern_vsnoop::IDLE_TIMEOUT_NS));
    assert_eq!(v.poll_gc(1_000).flows, 0);
    assert_eq!(v.poll_gc(tern_vsnoop::IDLE_TIMEOUT_NS + 10).flows, 1);
    assert_eq!(v.poll_timeout(), None);
}

/// Golden bytes, computed independently (Python struct + RFC 1071 checksum).
const GOLDEN: [u8; 52] = [
    0x45, 0x00, 0x00, 0x34, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xad, 0x9c, 0xc6, 0x12, 0x01, 0x02,
    0xc6, 0x12, 0x00, 0x01, 0x00, 0x50, 0x9c, 0x40, 0x00, 0x4c, 0x4b, 0x41, 0x12, 0x34, 0x56, 0x78,
    0x80, 0x10, 0x04, 0xd2, 0x8d, 0x09, 0x00, 0x00, 0x01, 0x01, 0x08, 0x0a, 0x00, 0x00, 0x03, 0x09,
    0x00, 0x00, 0x03, 0xe7,
];

fn spec() -> AckSpec {
    AckSpec {
        src: V,
        dst: S,
        sport: 80,
        dport: 40000,
        seq: 5_000_001,
        ack: 0x1234_5678,
        window: 1234,
        timestamps: Some((777, 999)),
    }
}

fn ones_sum(b: &[u8]) -> u32 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

fn tcp_ok(p: &[u8]) -> bool {
    let mut ph = Vec::new();
    ph.extend_from_slice(&p[12..20]);
    ph.extend_from_slice(&[0, 6]);
    ph.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
    ph.extend_from_slice(&p[20..]);
    ones_sum(&ph) == 0xffff
}

#[test]
fn early_ack_golden_bytes() {
    let p = build_ack(&spec());
    assert_eq!(p, GOLDEN);
    assert_eq!(ones_sum(&p[..20]), 0xffff);
    assert!(tcp_ok(&p));
    let s = parse_ipv4_tcp(&p).unwrap();
    assert_eq!((s.ack, s.window, s.flags), (0x1234_5678, 1234, ACK));
    assert_eq!(s.options.timestamps, Some((777, 999)));
    assert!(!s.options.unknown);
    // Without timestamps: 40 bytes, checksums still valid.
    let p = build_ack(&AckSpec {
        timestamps: None,
        ..spec()
    });
    assert_eq!(p.len(), 40);
    assert!(tcp_ok(&p));
}

#[test]
fn rewrite_keeps_the_checksum_valid() {
    let mut p = build_ack(&spec());
    assert!(rewrite_ack(&mut p, 0xdead_beef, 77));
    assert!(tcp_ok(&p));
    let s = parse_ipv4_tcp(&p).unwrap();
    assert_eq!((s.ack, s.window), (0xdead_beef, 77));
    let mut junk = vec![0x45, 0, 0];
    assert!(!rewrite_ack(&mut junk, 1, 1));
}

#[test]
fn parse_never_panics_on_mutations() {
    let good = build_ack(&spec());
    for cut in 0..good.len() {
        let _ = parse_ipv4_tcp(&good[..cut]);
    }
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut m = good.clone();
        let n = m.len();
        m[(x as usize) % n] = (x >> 32) as u8;
        m[((x >> 8) as usize) % n] = (x >> 40) as u8;
        if let Some(s) = parse_ipv4_tcp(&m) {
            let mut v = Vsnoop::new();
            let _ = v.handle_segment_to_vm(0, &s, BIG);
            let _ = v.handle_segment_from_vm(0, &s);
        }
    }
}

#[test]
fn vm_initiated_connection_is_tracked_from_the_vms_syn() {
    let mut v = Vsnoop::new();
    // The VM connects out (a download into the VM).
    let mut syn = seg(false, VISN, 0, SYN, 0, 29200);
    syn.options.wscale = Some(3);
    assert_eq!(v.handle_segment_from_vm(0, &syn), FromVm::Forward);
    let (snd, vm) = key();
    assert_eq!(v.state(snd, vm), Some(State::SynSeen));
    let mut sa = seg(true, ISN, VISN + 1, SYN | ACK, 0, 65535);
    sa.options.wscale = Some(7);
    let a = v.handle_segment_to_vm(1, &sa, BIG);
    assert!(
        a.early_ack.is_none(),
        "a SYN-ACK is never acknowledged early"
    );
    assert_eq!(v.state(snd, vm), Some(State::Active));
    // The VM's ACK of the SYN-ACK: window 8192 << 3 = 65536.
    let ack = seg(false, VISN + 1, ISN + 1, ACK, 0, 8192);
    assert_eq!(v.handle_segment_from_vm(2, &ack), FromVm::Forward);
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1448, 512);
    let e = v
        .handle_segment_to_vm(3, &d, BIG)
        .early_ack
        .expect("early ack");
    assert_eq!((e.seq, e.ack), (VISN + 1, ISN + 1449));
    assert_eq!(e.window, ((65536 - 1448) >> 3) as u16);
    // Without window scaling on the sender's side the VM's window is unscaled.
    let mut v = Vsnoop::new();
    v.handle_segment_from_vm(0, &syn);
    let sa = seg(true, ISN, VISN + 1, SYN | ACK, 0, 65535);
    v.handle_segment_to_vm(1, &sa, BIG);
    v.handle_segment_from_vm(2, &seg(false, VISN + 1, ISN + 1, ACK, 0, 29200));
    let d = seg(true, ISN + 1, VISN + 1, ACK, 1448, 512);
    let e = v
        .handle_segment_to_vm(3, &d, BIG)
        .early_ack
        .expect("early ack");
    assert_eq!(e.window, 29200 - 1448);
    // A smaller window than the SYN's (right edge moves left) is a shrink: pass-through.
    v.handle_segment_from_vm(4, &seg(false, VISN + 1, ISN + 1449, ACK, 0, 100));
    assert_eq!(
        v.state(snd, vm),
        Some(State::Passthrough(PassReason::WindowShrink))
    );
}
