#![no_main]
//! `Endpoint::handle_datagram` on a responder with fixed keys: arbitrary datagrams
//! (`u8 meta | le16 len | len bytes`, repeated; meta picks one of four source addresses and
//! how far the clock moves), optionally after a genuine initiation from its pinned peer has
//! established a session. Never a panic; every datagram is counted.
use std::net::SocketAddr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tern_transport::crypto::StaticKeypair;
use tern_transport::{Config, Endpoint, PeerConfig};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1 + (i & 3)], 7000))
}

/// The two fixed identities (deriving a public key is the slow part of a run).
static KEYS: LazyLock<(StaticKeypair, StaticKeypair)> =
    LazyLock::new(|| (StaticKeypair::from_seed(1), StaticKeypair::from_seed(2)));

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let (a_id, b_id) = KEYS.clone();
    let a_pub = a_id.public;
    let b_pub = b_id.public;
    let mut b = Endpoint::new(
        b_id,
        vec![PeerConfig {
            name: "a".into(),
            public: a_pub,
            addr: None,
        }],
        Config::default(),
        7,
        true,
        1_000_000_000,
    );
    let mut now_ns = 1_000_000u64;
    let mut sent = 0u64;
    let mut out = Vec::new();
    if flags & 1 != 0 {
        // A genuine initiation from the pinned peer, so data packets reach a connection.
        let mut a = Endpoint::new(
            a_id,
            vec![PeerConfig {
                name: "b".into(),
                public: b_pub,
                addr: Some(addr(1)),
            }],
            Config::default(),
            5,
            true,
            2_000_000_000,
        );
        a.handle_timeout(now_ns);
        while a.poll_transmit(now_ns, &mut out).is_some() {
            b.handle_datagram(now_ns, addr(0), &out);
            out.clear();
            sent += 1;
        }
    }
    while let [meta, lo, hi, tail @ ..] = rest {
        let meta = *meta;
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (dgram, tail) = tail.split_at(len);
        rest = tail;
        now_ns += u64::from(meta >> 2 & 3) * 300_000_000;
        b.handle_datagram(now_ns, addr(meta), dgram);
        sent += 1;
        b.handle_timeout(now_ns);
        while b.poll_transmit(now_ns, &mut out).is_some() {
            out.clear();
        }
        while b.poll_event().is_some() {}
    }
    assert_eq!(b.stats().datagrams_received, sent);
});
