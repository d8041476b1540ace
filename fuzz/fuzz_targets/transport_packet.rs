#![no_main]
//! An established connection's packet path: a real handshake gives both sides' keys, then
//! each fuzz payload (`u8 len | len bytes` frames, repeated) is sealed by the initiator and
//! handed to the responder's `Connection::handle_packet`, so the frame parser and the
//! stream, ack, reset and flow-control logic see arbitrary authenticated frames.
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tern_transport::crypto::{InitiatorHandshake, StaticKeypair, accept_initiation};
use tern_transport::{Config, Connection, Event, wire};

/// The two fixed identities (deriving a public key is the slow part of a run).
static KEYS: LazyLock<(StaticKeypair, StaticKeypair)> =
    LazyLock::new(|| (StaticKeypair::from_seed(1), StaticKeypair::from_seed(2)));

fuzz_target!(|data: &[u8]| {
    let (a, b) = &*KEYS;
    let (hs, m1) = InitiatorHandshake::start(a, &b.public, &[1], Some(3)).expect("start");
    let acc = accept_initiation(b, &m1, Some(4)).expect("accept");
    let (m2, b_keys) = acc.respond(&[1]).expect("respond");
    let (_, mut a_keys) = hs.finish(&m2).expect("finish");
    let mut conn = Connection::new(Config::default(), b_keys, false, 0);
    let mut rest = data;
    let mut pn = 0u64;
    let mut now_ns = 0u64;
    let mut ct = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some((&meta, tail)) = rest.split_first() {
        let len = usize::from(meta).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        // Mostly in order; sometimes a jump, as reordering and loss would give.
        pn += 1 + u64::from(meta & 1) * 7;
        now_ns += 1_000_000;
        ct.clear();
        if a_keys.seal(pn, payload, &mut ct).is_err() {
            continue;
        }
        let header_len = wire::data_header_len(pn, None);
        let mask = (1u64 << wire::packet_number_bits(header_len)) - 1;
        conn.handle_packet(now_ns, pn & mask, header_len, &ct);
        conn.handle_timeout(now_ns);
        while let Some(ev) = conn.poll_event() {
            if let Event::StreamOpened(id) | Event::Readable(id) = ev {
                let _ = conn.stream_read(id, &mut buf);
            }
        }
        for _ in 0..4 {
            out.clear();
            if !conn.poll_transmit(now_ns, &mut out) {
                break;
            }
        }
    }
});
