//! Deterministic simulation tests: every byte arrives once and in order over hostile links, and
//! a seed replays to the same trace.

use tern_transport::Config;
use tern_transport::sim::{LinkParams, Outcome, Scenario, run};

fn scenario(seed: u64, link: LinkParams) -> Scenario {
    Scenario {
        seed,
        link,
        streams: 4,
        max_stream_bytes: 400_000,
        time_limit_ns: 120_000_000_000,
        config: Config::default(),
        resets: 0,
    }
}

#[test]
fn clean_link_delivers_everything() {
    let out = run(&scenario(1, LinkParams::default())).unwrap();
    assert_eq!(out.streams_completed, 8);
    assert_eq!(out.dropped, 0);
}

#[test]
fn lossy_jittery_reordering_duplicating_links() {
    for seed in 0..12u64 {
        let link = LinkParams {
            delay_ns: 5_000_000 + seed * 3_000_000,
            jitter_ns: 4_000_000,
            reorder: seed % 2 == 0,
            loss: [0.0005, 0.01, 0.05][seed as usize % 3],
            duplicate: 0.01,
            rate_bps: 50_000_000,
            queue_bytes: 300_000,
            partitions: Vec::new(),
        };
        let out = run(&scenario(seed, link)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.streams_completed, 8, "seed {seed}");
    }
}

#[test]
fn survives_a_partition() {
    let link = LinkParams {
        loss: 0.01,
        partitions: vec![(200_000_000, 3_200_000_000)],
        ..LinkParams::default()
    };
    let out = run(&scenario(42, link)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.streams_completed, 8);
}

#[test]
fn same_seed_same_trace() {
    let link = LinkParams {
        loss: 0.02,
        jitter_ns: 2_000_000,
        reorder: true,
        duplicate: 0.02,
        ..LinkParams::default()
    };
    let a = run(&scenario(7, link.clone())).unwrap();
    let b = run(&scenario(7, link.clone())).unwrap();
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.finished_at_ns, b.finished_at_ns);
    let c = run(&scenario(8, link)).unwrap();
    assert_ne!(a.trace_hash, c.trace_hash);
}

#[test]
fn resets_reach_the_peer_and_other_streams_continue() {
    let mut sc = scenario(
        5,
        LinkParams {
            loss: 0.01,
            ..LinkParams::default()
        },
    );
    sc.resets = 2;
    let out = run(&sc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.streams_reset, 2);
    assert_eq!(out.streams_completed, 6);
}

/// Streams far past 2^24 bytes, over a reordering, duplicating, lossy link: STREAM_END
/// frames carry 3-byte offsets here, which wrap several times and must expand to the right
/// offset every time (the receiver checks every byte).
#[test]
fn long_streams_wrap_truncated_offsets() {
    let link = LinkParams {
        delay_ns: 4_000_000,
        jitter_ns: 3_000_000,
        reorder: true,
        loss: 0.005,
        duplicate: 0.01,
        rate_bps: 400_000_000,
        queue_bytes: 1_000_000,
        partitions: Vec::new(),
    };
    let mut sc = scenario(21, link);
    sc.streams = 2;
    sc.max_stream_bytes = 120_000_000;
    let out = run(&sc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.streams_completed, 4);
    assert!(out.bytes_delivered > 3 << 24, "{}", out.bytes_delivered);
}

/// Two streams of up to `max_stream_bytes` over 100 Mbit/s with 1 % random loss and a
/// one-way delay of `delay_ns`.
fn two_streams_over_1_percent_loss(delay_ns: u64, max_stream_bytes: usize) -> Outcome {
    let link = LinkParams {
        loss: 0.01,
        rate_bps: 100_000_000,
        delay_ns,
        ..LinkParams::default()
    };
    let mut sc = scenario(11, link);
    sc.streams = 2;
    sc.max_stream_bytes = max_stream_bytes;
    run(&sc).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn fec_repairs_random_loss() {
    let out = two_streams_over_1_percent_loss(12_000_000, 20_000_000);
    let s = &out.stats_a;
    assert!(
        out.stats_a.fec_repairs_sent + out.stats_b.fec_repairs_sent > 0,
        "{s:?}"
    );
    assert!(
        out.stats_a.fec_recovered + out.stats_b.fec_recovered > 0,
        "{s:?}"
    );
}

/// Below a 4 ms RTT a retransmission beats a repair: FEC stays off, and every byte still
/// arrives.
#[test]
fn no_fec_on_short_paths() {
    let out = two_streams_over_1_percent_loss(500_000, 5_000_000);
    assert_eq!(
        out.stats_a.fec_repairs_sent + out.stats_b.fec_repairs_sent,
        0,
        "{:?}",
        out.stats_a
    );
    assert!(out.dropped > 0);
}

/// Goodput of one long stream over an mpls-like link in virtual time (prints; for tuning).
#[test]
#[ignore]
fn print_goodput_mpls() {
    for (rate, delay, loss) in [
        (100_000_000u64, 12_500_000u64, 0.0005),
        (1_000_000_000, 6_000_000, 0.001),
    ] {
        let link = LinkParams {
            delay_ns: delay,
            jitter_ns: 3_000_000,
            loss,
            rate_bps: rate,
            queue_bytes: (rate / 8 * delay * 2 / 1_000_000_000).max(150_000),
            ..LinkParams::default()
        };
        let mut sc = scenario(3, link);
        sc.streams = 1;
        sc.max_stream_bytes = 200_000_000;
        let out = run(&sc).unwrap();
        let secs = out.finished_at_ns as f64 / 1e9;
        println!(
            "rate {rate}: {} bytes in {secs:.2} s = {:.1} Mbit/s per direction; {} of {} datagrams dropped; a {:?}",
            out.bytes_delivered / 2,
            out.bytes_delivered as f64 * 4.0 / secs / 1e6,
            out.dropped,
            out.datagrams,
            out.stats_a
        );
    }
}

/// Issue 25, defect 3: a connection that updates its keys many times (by packet count on one
/// run, by time on another) over a lossy, reordering, duplicating link delivers every byte,
/// and the key updates cost nothing: the run finishes when the same seed without updates
/// does (virtual time; same packets, same link draws).
#[test]
fn many_key_updates_under_loss_and_reorder_deliver_everything() {
    let link = LinkParams {
        delay_ns: 15_000_000,
        jitter_ns: 4_000_000,
        reorder: true,
        loss: 0.01,
        duplicate: 0.01,
        rate_bps: 50_000_000,
        queue_bytes: 300_000,
        partitions: Vec::new(),
    };
    let base = run(&scenario(7, link.clone())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(base.stats_a.key_updates_sent, 0);
    let by_count = Scenario {
        config: Config {
            rekey_after_packets: 50,
            ..Config::default()
        },
        ..scenario(7, link.clone())
    };
    let by_time = Scenario {
        config: Config {
            rekey_after_us: 20_000,
            ..Config::default()
        },
        ..scenario(7, link)
    };
    for (what, sc) in [("count", by_count), ("time", by_time)] {
        let out = run(&sc).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(out.streams_completed, 8, "{what}");
        assert_eq!(out.bytes_delivered, base.bytes_delivered, "{what}");
        let (a, b) = (&out.stats_a, &out.stats_b);
        assert!(a.key_updates_sent >= 6, "{what}: {a:?}");
        assert!(b.key_updates_sent >= 6, "{what}: {b:?}");
        // The last update's packets may still be in flight when the run ends.
        for (from, to) in [(a, b), (b, a)] {
            assert!(
                (from.key_updates_sent - 1..=from.key_updates_sent)
                    .contains(&to.key_updates_received),
                "{what}: {} sent, {} followed",
                from.key_updates_sent,
                to.key_updates_received
            );
        }
        assert!(
            a.old_key_packets + b.old_key_packets > 0,
            "{what}: late packets"
        );
        assert_eq!(a.old_key_rejected + b.old_key_rejected, 0, "{what}");
        assert!(
            out.finished_at_ns <= base.finished_at_ns + base.finished_at_ns / 100,
            "{what}: {} vs {} ns",
            out.finished_at_ns,
            base.finished_at_ns
        );
    }
}
