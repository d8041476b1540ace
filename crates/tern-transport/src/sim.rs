//! Deterministic simulation: two endpoints over a simulated link in virtual time.
//!
//! The link has per-direction delay, jitter (reordering when `reorder`), Bernoulli loss,
//! duplication, a serialization rate with a drop-tail queue, and partitions (time windows in
//! which everything is dropped). Each side opens `streams` streams and sends pseudo-random
//! data derived from (seed, stream id), then FIN; the receiver checks every byte and the
//! final length. A run yields a trace hash: the same seed gives the same hash.

use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;

use crate::connection::{Config, Event};
use crate::crypto::StaticKeypair;
use crate::endpoint::{Endpoint, EndpointEvent, PeerConfig};

#[derive(Debug, Clone)]
pub struct LinkParams {
    pub delay_ns: u64,
    pub jitter_ns: u64,
    pub reorder: bool,
    pub loss: f64,
    pub duplicate: f64,
    pub rate_bps: u64,
    pub queue_bytes: u64,
    /// (start, end) virtual-time windows in which the link drops everything.
    pub partitions: Vec<(u64, u64)>,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay_ns: 10_000_000,
            jitter_ns: 0,
            reorder: false,
            loss: 0.0,
            duplicate: 0.0,
            rate_bps: 100_000_000,
            queue_bytes: 1 << 20,
            partitions: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub link: LinkParams,
    /// Streams each side opens.
    pub streams: usize,
    /// Maximum bytes per stream (actual sizes are drawn from 0..=max).
    pub max_stream_bytes: usize,
    /// Virtual-time limit.
    pub time_limit_ns: u64,
    pub config: Config,
    /// Reset this many of A's streams midway (both sides must see the reset, nothing else).
    pub resets: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub trace_hash: u64,
    pub finished_at_ns: u64,
    pub bytes_delivered: u64,
    pub datagrams: u64,
    pub dropped: u64,
    pub streams_completed: usize,
    pub streams_reset: usize,
    pub stats_a: crate::connection::ConnStats,
    pub stats_b: crate::connection::ConnStats,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("seed {seed}: stream {stream} byte {offset} differs")]
    Corrupt { seed: u64, stream: u64, offset: u64 },
    #[error("seed {seed}: stream {stream} ended at {got} bytes, expected {expected}")]
    Length {
        seed: u64,
        stream: u64,
        got: u64,
        expected: u64,
    },
    #[error("seed {seed}: not finished after {limit_ns} ns ({done}/{total} streams done)")]
    Timeout {
        seed: u64,
        limit_ns: u64,
        done: usize,
        total: usize,
    },
    #[error("seed {seed}: {what}")]
    Protocol { seed: u64, what: String },
}

/// SplitMix64, used for the link and the data.
#[derive(Debug, Clone)]
pub struct SimRng(u64);
impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Byte `offset` of stream `id` sent by side `side`.
fn data_byte(seed: u64, side: u8, id: u64, offset: u64) -> u8 {
    let mut r =
        SimRng::new(seed ^ (u64::from(side) << 60) ^ id.wrapping_mul(0x1000_0001) ^ (offset / 8));
    (r.next_u64() >> ((offset % 8) * 8)) as u8
}

fn stream_len(seed: u64, side: u8, index: usize, max: usize) -> u64 {
    let mut r = SimRng::new(seed ^ 0xabcd ^ (u64::from(side) << 40) ^ index as u64);
    r.next_u64() % (max as u64 + 1)
}

struct Side {
    ep: Endpoint,
    addr: SocketAddr,
    /// Local streams: id -> (len, written, finished, reset)
    sending: BTreeMap<u64, (u64, u64, bool)>,
    /// Peer streams: id -> bytes verified
    receiving: BTreeMap<u64, u64>,
    opened: bool,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: std::cmp::Reverse<(u64, u64)>,
    to_b: bool,
    data: Vec<u8>,
}

fn mix(h: &mut u64, v: u64) {
    *h = (*h ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(17);
}

/// Runs a scenario; Err describes the first violated property with its seed.
pub fn run(sc: &Scenario) -> Result<Outcome, SimError> {
    let seed = sc.seed;
    let ka = StaticKeypair::from_seed(seed.wrapping_mul(3) | 1);
    let kb = StaticKeypair::from_seed(seed.wrapping_mul(5) | 2);
    let addr_a: SocketAddr = "198.18.1.1:7000".parse().expect("valid");
    let addr_b: SocketAddr = "198.18.2.1:7000".parse().expect("valid");
    let peer_b = PeerConfig {
        name: "b".into(),
        public: kb.public,
        addr: Some(addr_b),
    };
    let peer_a = PeerConfig {
        name: "a".into(),
        public: ka.public,
        addr: Some(addr_a),
    };
    let mut sides = [
        Side {
            ep: Endpoint::new(ka, vec![peer_b], sc.config.clone(), seed ^ 1, true, 1 << 40),
            addr: addr_a,
            sending: BTreeMap::new(),
            receiving: BTreeMap::new(),
            opened: false,
        },
        Side {
            ep: Endpoint::new(kb, vec![peer_a], sc.config.clone(), seed ^ 2, true, 1 << 40),
            addr: addr_b,
            sending: BTreeMap::new(),
            receiving: BTreeMap::new(),
            opened: false,
        },
    ];
    let mut rng = SimRng::new(seed);
    let mut queue: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut link_free = [0u64; 2];
    let mut last_delivery = [0u64; 2];
    let mut now = 0u64;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let (mut datagrams, mut dropped, mut delivered) = (0u64, 0u64, 0u64);
    let mut completed = 0usize;
    let mut reset_done = 0usize;
    let total_streams = 2 * sc.streams;
    let mut reset_seen = 0usize;
    let mut buf = vec![0u8; 65536];
    let mut last_trace = 0u64;
    let mut out = Vec::with_capacity(2048);
    loop {
        // Application work and transmissions on both sides.
        #[allow(clippy::needless_range_loop)] // `si` also names the side in the data
        for si in 0..2 {
            let side = &mut sides[si];
            while let Some(ev) = side.ep.poll_event() {
                match ev {
                    EndpointEvent::Connected(_) => mix(&mut hash, 1 + si as u64),
                    EndpointEvent::Disconnected { code, .. } => {
                        return Err(SimError::Protocol {
                            seed,
                            what: format!("side {si} disconnected (code {code}) at {now} ns"),
                        });
                    }
                    EndpointEvent::Stream { event, .. } => match event {
                        Event::StreamOpened(id) => {
                            side.receiving.insert(id, 0);
                        }
                        Event::Readable(id) => {
                            let Some(c) = side.ep.connection(0) else {
                                continue;
                            };
                            while let Ok((n, fin)) = c.stream_read(id, &mut buf) {
                                let got = side.receiving.entry(id).or_insert(0);
                                for (i, &b) in buf[..n].iter().enumerate() {
                                    let off = *got + i as u64;
                                    if b != data_byte(seed, 1 - si as u8, id, off) {
                                        return Err(SimError::Corrupt {
                                            seed,
                                            stream: id,
                                            offset: off,
                                        });
                                    }
                                }
                                *got += n as u64;
                                delivered += n as u64;
                                mix(&mut hash, n as u64);
                                if fin {
                                    let index = (id / 2) as usize;
                                    let expected =
                                        stream_len(seed, 1 - si as u8, index, sc.max_stream_bytes);
                                    if *got != expected {
                                        return Err(SimError::Length {
                                            seed,
                                            stream: id,
                                            got: *got,
                                            expected,
                                        });
                                    }
                                    completed += 1;
                                    if std::env::var_os("TERN_SIM_DEBUG").is_some() {
                                        eprintln!("side {si}: stream {id} complete at {now}");
                                    }
                                    break;
                                }
                                if n == 0 {
                                    break;
                                }
                            }
                        }
                        Event::Writable(_) => {}
                        Event::StreamReset { id, .. } => {
                            reset_seen += 1;
                            side.receiving.remove(&id);
                            mix(&mut hash, 0x5e5e ^ id);
                        }
                        Event::Closed { code } => {
                            return Err(SimError::Protocol {
                                seed,
                                what: format!("closed {code}"),
                            });
                        }
                    },
                }
            }
            if !side.opened && side.ep.is_connected(0) {
                side.opened = true;
                let c = side.ep.connection(0).expect("connected");
                for i in 0..sc.streams {
                    let id = c.open_stream().map_err(|e| SimError::Protocol {
                        seed,
                        what: e.to_string(),
                    })?;
                    let len = stream_len(seed, si as u8, i, sc.max_stream_bytes);
                    debug_assert_eq!((id / 2) as usize, i);
                    side.sending.insert(id, (len, 0, false));
                }
            }
            // Write as much as the streams accept.
            if let Some(c) = side.ep.connection(0) {
                let ids: Vec<u64> = side.sending.keys().copied().collect();
                for id in ids {
                    let (len, written, finished) = side.sending[&id];
                    if finished {
                        continue;
                    }
                    // The first `resets` streams of side A send half their data, then reset.
                    let resetting = si == 0 && ((id / 2) as usize) < sc.resets;
                    if resetting && written >= len / 2 {
                        c.stream_reset(id, 7).map_err(|e| SimError::Protocol {
                            seed,
                            what: e.to_string(),
                        })?;
                        reset_done += 1;
                        side.sending.insert(id, (len, written, true));
                        continue;
                    }
                    let limit = if resetting { len / 2 } else { len };
                    let cap = c.stream_capacity(id).min(buf.len());
                    let n = ((limit - written) as usize).min(cap);
                    if n > 0 {
                        for (i, b) in buf[..n].iter_mut().enumerate() {
                            *b = data_byte(seed, si as u8, id, written + i as u64);
                        }
                        let w = c
                            .stream_write(id, &buf[..n])
                            .map_err(|e| SimError::Protocol {
                                seed,
                                what: e.to_string(),
                            })?;
                        side.sending.get_mut(&id).expect("present").1 += w as u64;
                    }
                    if side.sending[&id].1 == len {
                        c.stream_finish(id).map_err(|e| SimError::Protocol {
                            seed,
                            what: e.to_string(),
                        })?;
                        side.sending.get_mut(&id).expect("present").2 = true;
                    }
                }
            }
            loop {
                out.clear();
                let Some(_to) = side.ep.poll_transmit(now, &mut out) else {
                    break;
                };
                datagrams += 1;
                let dir = si; // 0: a->b
                mix(&mut hash, out.len() as u64 ^ (now << 8));
                let in_partition = sc.link.partitions.iter().any(|&(s, e)| now >= s && now < e);
                // Serialization and queue.
                let ser = out.len() as u64 * 8 * 1_000_000_000 / sc.link.rate_bps.max(1);
                let backlog =
                    link_free[dir].saturating_sub(now) * sc.link.rate_bps / 8 / 1_000_000_000;
                if in_partition || backlog > sc.link.queue_bytes || rng.chance(sc.link.loss) {
                    dropped += 1;
                    continue;
                }
                link_free[dir] = link_free[dir].max(now) + ser;
                let copies = if rng.chance(sc.link.duplicate) { 2 } else { 1 };
                for _ in 0..copies {
                    let jitter = if sc.link.jitter_ns > 0 {
                        rng.next_u64() % sc.link.jitter_ns
                    } else {
                        0
                    };
                    let mut at = link_free[dir] + sc.link.delay_ns + jitter;
                    if !sc.link.reorder {
                        at = at.max(last_delivery[dir]);
                        last_delivery[dir] = at;
                    }
                    seq += 1;
                    queue.push(InFlight {
                        at: std::cmp::Reverse((at, seq)),
                        to_b: dir == 0,
                        data: out.clone(),
                    });
                }
            }
        }
        let all_sent = sides
            .iter()
            .all(|s| s.opened && s.sending.values().all(|v| v.2));
        if all_sent && completed + reset_seen >= total_streams {
            // Drain: let the last ACKs settle so both sides agree nothing is outstanding.
            break;
        }
        if std::env::var_os("TERN_SIM_TRACE").is_some() && now / 100_000_000 != last_trace {
            last_trace = now / 100_000_000;
            if let Some(c) = sides[0].ep.connection_ref(0) {
                let st = c.stats();
                eprintln!(
                    "t={:.1}s pacing {:.1} Mbit cwnd {} inflight {} srtt {} min {} lost {} mode {:?} dropped {}",
                    now as f64 / 1e9,
                    st.pacing_rate_bps as f64 / 1e6,
                    st.cwnd_bytes,
                    st.bytes_in_flight,
                    st.srtt_us,
                    st.min_rtt_us,
                    st.packets_lost,
                    c.cc_mode(),
                    dropped
                );
            }
        }
        // Advance virtual time.
        let mut next = queue.peek().map(|f| f.at.0.0);
        for s in &sides {
            if let Some(t) = s.ep.poll_timeout() {
                next = Some(next.map_or(t, |n: u64| n.min(t)));
            }
        }
        let Some(next) = next else {
            return Err(SimError::Protocol {
                seed,
                what: "nothing to do".into(),
            });
        };
        now = now.max(next);
        if now > sc.time_limit_ns {
            if std::env::var_os("TERN_SIM_DEBUG").is_some() {
                for (i, s) in sides.iter().enumerate() {
                    eprintln!(
                        "side {i}: sending {:?} receiving {:?}",
                        s.sending, s.receiving
                    );
                    if let Some(c) = s.ep.connection_ref(0) {
                        eprintln!("side {i}: {:?}", c.stats());
                    }
                }
            }
            return Err(SimError::Timeout {
                seed,
                limit_ns: sc.time_limit_ns,
                done: completed + reset_seen,
                total: total_streams,
            });
        }
        while queue.peek().is_some_and(|f| f.at.0.0 <= now) {
            let f = queue.pop().expect("peeked");
            let (to, from) = if f.to_b { (1, 0) } else { (0, 1) };
            let from_addr = sides[from].addr;
            sides[to].ep.handle_datagram(now, from_addr, &f.data);
        }
        for s in &mut sides {
            s.ep.handle_timeout(now);
        }
    }
    debug_assert_eq!(reset_done, sc.resets);
    let stats_a = sides[0]
        .ep
        .connection_ref(0)
        .map(|c| c.stats())
        .unwrap_or_default();
    let stats_b = sides[1]
        .ep
        .connection_ref(0)
        .map(|c| c.stats())
        .unwrap_or_default();
    mix(&mut hash, delivered);
    Ok(Outcome {
        trace_hash: hash,
        finished_at_ns: now,
        bytes_delivered: delivered,
        datagrams,
        dropped,
        streams_completed: completed,
        streams_reset: reset_seen,
        stats_a,
        stats_b,
    })
}
