//! Deterministic tests of the link model in virtual time.

use tern_link::{DirectionConfig, JitterShape, Link, LinkSpec, LossModel, Offer, parse_loss};

const MS: u64 = 1_000_000;

fn cfg(rate_bps: u64, delay_us: u64) -> DirectionConfig {
    let mut c = LinkSpec::new(rate_bps, delay_us * 2, 0.0, 0).direction();
    c.queue_limit_bytes = 10_000_000;
    c
}

/// Drains the link, stepping virtual time to each deadline; returns (time, packet id).
fn drain(link: &mut Link<u64>, mut now: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    loop {
        while let Some(p) = link.poll_deliver(now) {
            out.push((now, p));
        }
        match link.next_deadline_ns() {
            Some(t) => {
                assert!(
                    t > now,
                    "deadline {t} not after now {now} with nothing deliverable"
                );
                now = t;
            }
            None => return out,
        }
    }
}

#[test]
fn serialization_clock_spaces_packets_by_rate() {
    // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms on the wire.
    let mut link = Link::new(cfg(12_000_000, 10_000), 1);
    for id in 0..10 {
        assert_eq!(link.offer(0, 1500, id), Offer::Accepted);
    }
    let out = drain(&mut link, 0);
    let times: Vec<u64> = out.iter().map(|(t, _)| *t).collect();
    let expected: Vec<u64> = (1..=10).map(|k| k * MS + 10 * MS).collect();
    assert_eq!(times, expected);
    assert_eq!(
        out.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
}

#[test]
fn idle_link_restarts_clock_at_arrival() {
    let mut link = Link::new(cfg(12_000_000, 0), 1);
    link.offer(0, 1500, 0);
    link.offer(50 * MS, 1500, 1);
    let out = drain(&mut link, 0);
    assert_eq!(out, vec![(MS, 0), (51 * MS, 1)]);
}

#[test]
fn unlimited_rate_zero_delay_delivers_immediately() {
    let mut link = Link::new(cfg(0, 0), 1);
    link.offer(5, 1500, 7);
    assert_eq!(link.poll_deliver(5), Some(7));
    assert_eq!(link.next_deadline_ns(), None);
}

#[test]
fn queue_overflow_drops_tail_by_packets_and_bytes() {
    let mut c = cfg(12_000_000, 0);
    c.queue_limit_packets = 5;
    let mut link = Link::new(c.clone(), 1);
    let verdicts: Vec<bool> = (0..10)
        .map(|i| link.offer(0, 1500, i) == Offer::Accepted)
        .collect();
    assert_eq!(
        verdicts,
        [
            true, true, true, true, true, false, false, false, false, false
        ]
    );
    // After one packet has serialized, there is room for exactly one more.
    assert_eq!(link.offer(MS, 1500, 10), Offer::Accepted);
    assert_eq!(link.offer(MS, 1500, 11), Offer::QueueDrop(11));
    let s = link.stats();
    assert_eq!(s.counters.queue_drop_packets, 6);
    assert_eq!(s.counters.queue_drop_bytes, 9000);

    c.queue_limit_packets = 1000;
    c.queue_limit_bytes = 4000;
    let mut link = Link::new(c, 1);
    assert_eq!(link.offer(0, 1500, 0), Offer::Accepted);
    assert_eq!(link.offer(0, 1500, 1), Offer::Accepted);
    assert_eq!(link.offer(0, 1500, 2), Offer::QueueDrop(2));
    assert_eq!(link.offer(0, 1000, 3), Offer::Accepted);
    assert_eq!(link.stats().counters.max_queue_bytes, 4000);
}

#[test]
fn jitter_without_reorder_keeps_order_and_bounds() {
    let mut c = cfg(0, 10_000);
    c.jitter_us = 3_000;
    let mut link = Link::new(c, 42);
    // One packet every 100 µs: jitter is much larger than the spacing.
    for id in 0..20_000u64 {
        link.offer(id * 100_000, 100, id);
    }
    let out = drain(&mut link, 0);
    assert_eq!(out.len(), 20_000);
    let mut prev = 0;
    for (t, id) in &out {
        assert!(*id == 0 || *id > prev, "reordered at {id}");
        prev = *id;
        let delay = t - id * 100_000;
        assert!((7 * MS..=13 * MS + 100_000 * 20_000).contains(&delay));
    }
}

#[test]
fn jitter_shapes_have_stated_spread_and_reorder_option() {
    for shape in [JitterShape::Uniform, JitterShape::Normal] {
        let mut c = cfg(0, 10_000);
        c.jitter_us = 2_000;
        c.jitter_shape = shape;
        c.reorder = true;
        let mut link = Link::new(c, 9);
        // Sparse packets (1 per 50 ms) so order clamping cannot distort the delay samples.
        let n = 20_000u64;
        for id in 0..n {
            link.offer(id * 50 * MS, 100, id);
        }
        let out = drain(&mut link, 0);
        let delays: Vec<f64> = out
            .iter()
            .map(|(t, id)| (t - id * 50 * MS) as f64 / 1e3)
            .collect();
        let mean = delays.iter().sum::<f64>() / n as f64;
        let sd = (delays.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((mean - 10_000.0).abs() < 50.0, "{shape:?} mean {mean}");
        let want_sd = match shape {
            JitterShape::Uniform => 2_000.0 / 3f64.sqrt(),
            JitterShape::Normal => 2_000.0,
        };
        assert!(
            (sd - want_sd).abs() / want_sd < 0.03,
            "{shape:?} sd {sd} want {want_sd}"
        );
        let (lo, hi) = match shape {
            JitterShape::Uniform => (8_000.0, 12_000.0),
            JitterShape::Normal => (4_000.0, 16_000.0),
        };
        assert!(
            delays.iter().all(|d| (lo..=hi).contains(d)),
            "{shape:?} out of bounds"
        );
    }
    // With reorder on and dense traffic, some packets do overtake.
    let mut c = cfg(0, 10_000);
    c.jitter_us = 3_000;
    c.reorder = true;
    let mut link = Link::new(c, 5);
    for id in 0..1000u64 {
        link.offer(id * 100_000, 100, id);
    }
    let ids: Vec<u64> = drain(&mut link, 0).into_iter().map(|(_, p)| p).collect();
    assert!(ids.windows(2).any(|w| w[1] < w[0]));
}

fn binomial_99(n: u64, p: f64) -> (f64, f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (mean - 2.576 * sd, mean + 2.576 * sd)
}

#[test]
fn bernoulli_loss_within_binomial_interval_for_several_seeds() {
    let n = 1_000_000u64;
    let p = 0.0005;
    let mut outside = 0;
    for seed in 0..20 {
        let mut c = cfg(0, 0);
        c.loss = LossModel::Bernoulli { p };
        let mut link = Link::new(c, seed);
        let mut lost = 0u64;
        for i in 0..n {
            if let Offer::RandomDrop(_) = link.offer(i, 100, i) {
                lost += 1;
            }
            while link.poll_deliver(i).is_some() {}
        }
        let (lo, hi) = binomial_99(n, p);
        if !(lo..=hi).contains(&(lost as f64)) {
            outside += 1;
        }
        assert_eq!(link.stats().counters.random_drop_packets, lost);
        assert_eq!(link.stats().counters.forwarded_packets, n - lost);
    }
    // A 99% interval: at most a couple of 20 seeds may fall outside by chance.
    assert!(outside <= 2, "{outside} seeds outside the 99% interval");
}

#[test]
fn gilbert_elliott_loss_is_bursty_with_the_right_mean() {
    let model = parse_loss("ge:1%,25%").unwrap();
    let mut c = cfg(0, 0);
    c.loss = model;
    let mut link = Link::new(c, 11);
    let n = 2_000_000u64;
    let (mut lost, mut bursts, mut in_burst) = (0u64, 0u64, false);
    for i in 0..n {
        let dropped = matches!(link.offer(i, 100, i), Offer::RandomDrop(_));
        while link.poll_deliver(i).is_some() {}
        if dropped {
            lost += 1;
            if !in_burst {
                bursts += 1;
            }
        }
        in_burst = dropped;
    }
    let rate = lost as f64 / n as f64;
    assert!(
        (rate - model.mean_loss()).abs() / model.mean_loss() < 0.05,
        "rate {rate}"
    );
    let mean_burst = lost as f64 / bursts as f64;
    assert!((mean_burst - 4.0).abs() < 0.3, "mean burst {mean_burst}");
}

#[test]
fn reconfiguration_keeps_queued_packets_and_applies_new_rate() {
    let mut link = Link::new(cfg(12_000_000, 0), 1);
    for id in 0..10 {
        link.offer(0, 1500, id);
    }
    // At 2.5 ms two packets are out and the third is on the wire; switch to 120 Mbit/s.
    let mut out = Vec::new();
    while let Some(p) = link.poll_deliver(2_500_000) {
        out.push(p);
    }
    assert_eq!(out, vec![0, 1]);
    let mut faster = cfg(120_000_000, 5_000);
    faster.queue_limit_bytes = 10_000_000;
    link.set_config(2_500_000, faster);
    let rest = drain(&mut link, 2_500_000);
    assert_eq!(
        rest.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        (2..10).collect::<Vec<_>>()
    );
    // Packet 2 finishes at the old rate (3 ms), then 0.1 ms each, plus the new 5 ms delay.
    assert_eq!(rest[0].0, 3 * MS + 5 * MS);
    assert_eq!(rest[1].0, 3 * MS + 100_000 + 5 * MS);
    assert_eq!(rest[7].0, 3 * MS + 7 * 100_000 + 5 * MS);
    assert_eq!(link.stats().counters.forwarded_packets, 10);
}

#[test]
fn rate_is_never_exceeded_over_any_window_under_overload() {
    let rate = 100_000_000u64;
    let mut c = cfg(rate, 0);
    c.queue_limit_bytes = 300_000;
    let mut link = Link::new(c, 3);
    let mut rng = tern_link::Rng::new(99);
    let mut now = 0u64;
    let mut out: Vec<(u64, u64)> = Vec::new(); // (time, bytes)
    // Offer ~150 Mbit/s of mixed sizes for 1 s of virtual time.
    while now < 1_000 * MS {
        let len = 64 + (rng.next_u64() % 1437) as u32;
        link.offer(now, len, u64::from(len));
        while let Some(b) = link.poll_deliver(now) {
            out.push((now, b));
        }
        now += (u64::from(len) * 8 * 1_000_000_000) / 150_000_000;
    }
    let window = 10 * MS;
    let mut j = 0;
    let mut bytes = 0u64;
    for i in 0..out.len() {
        while out[j].0 + window < out[i].0 {
            bytes -= out[j].1;
            j += 1;
        }
        bytes += out[i].1;
        // One packet may straddle the window start, and deliveries are observed at poll
        // times up to one offer gap (< 1 packet time) late: two packets of slack.
        let allowed = rate * window / 8 / 1_000_000_000 + 2 * 1500;
        assert!(
            bytes <= allowed,
            "window ending {} carried {bytes} > {allowed}",
            out[i].0
        );
    }
    let s = link.stats();
    let total = s.counters.forwarded_bytes as f64 * 8.0;
    assert!(
        total / 1.0 <= rate as f64 * 1.01 && total >= rate as f64 * 0.97,
        "{total}"
    );
    assert!(s.counters.queue_drop_packets > 0);
}

#[test]
fn conservation_and_determinism_under_random_settings() {
    fn trace(seed: u64) -> (Vec<(u64, u64)>, tern_link::DirectionStats) {
        let mut rng = tern_link::Rng::new(seed);
        let mut c = cfg(
            1_000_000 + rng.next_u64() % 1_000_000_000,
            rng.next_u64() % 50_000,
        );
        c.jitter_us = rng.next_u64() % 5_000;
        c.reorder = rng.next_u64() % 2 == 0;
        c.loss = LossModel::Bernoulli { p: 0.01 };
        c.queue_limit_bytes = 20_000 + rng.next_u64() % 200_000;
        c.queue_limit_packets = 10 + (rng.next_u64() % 200) as u32;
        let mut link = Link::new(c.clone(), seed);
        let mut now = 0;
        let mut out = Vec::new();
        for id in 0..5_000u64 {
            now += rng.next_u64() % 200_000;
            if id == 2_500 {
                let mut c2 = c.clone();
                c2.rate_bps /= 2;
                link.set_config(now, c2);
            }
            link.offer(now, 40 + (rng.next_u64() % 1460) as u32, id);
            while let Some(p) = link.poll_deliver(now) {
                out.push((now, p));
            }
        }
        out.extend(drain(&mut link, now));
        (out, link.stats())
    }
    for seed in 0..30 {
        let (out, s) = trace(seed);
        let c = &s.counters;
        assert_eq!(c.offered_packets, 5_000);
        assert_eq!(
            c.forwarded_packets + c.queue_drop_packets + c.random_drop_packets,
            c.offered_packets,
            "seed {seed}"
        );
        assert_eq!(
            c.forwarded_bytes + c.queue_drop_bytes + c.random_drop_bytes,
            c.offered_bytes,
            "seed {seed}"
        );
        let mut ids: Vec<u64> = out.iter().map(|(_, p)| *p).collect();
        assert_eq!(ids.len() as u64, c.forwarded_packets);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len() as u64,
            c.forwarded_packets,
            "seed {seed}: a packet was delivered twice"
        );
        assert_eq!(trace(seed).0, out, "seed {seed} is not deterministic");
    }
}
