//! One direction of an emulated link, as a pure state machine over virtual time.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::{DirectionConfig, JitterShape, LossModel};
use crate::histogram::{Histogram, HistogramSummary};
use crate::rng::Rng;

/// What became of an offered packet. Dropped packets are handed back so the driver can
/// recycle their buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<P> {
    Accepted,
    /// Drop-tail: the queue was at its byte or packet limit.
    QueueDrop(P),
    /// Random loss drawn from the loss model.
    RandomDrop(P),
}

/// Counters of one direction since the link was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub offered_packets: u64,
    pub offered_bytes: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub queue_drop_packets: u64,
    pub queue_drop_bytes: u64,
    pub random_drop_packets: u64,
    pub random_drop_bytes: u64,
    /// Largest queue occupancy seen, in bytes.
    pub max_queue_bytes: u64,
}

/// A snapshot of one direction: counters, current occupancy, and histograms of measured
/// sojourn (offer to delivery) and lateness (delivery behind its scheduled time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionStats {
    #[serde(flatten)]
    pub counters: Counters,
    pub queued_packets: u64,
    pub queued_bytes: u64,
    pub in_flight_packets: u64,
    pub sojourn: HistogramSummary,
    pub lateness: HistogramSummary,
}

#[derive(Debug)]
struct Waiting<P> {
    enq_ns: u64,
    len: u32,
    pkt: P,
}

#[derive(Debug)]
struct InFlight<P> {
    arrive_ns: u64,
    seq: u64,
    enq_ns: u64,
    len: u32,
    pkt: P,
}

impl<P> PartialEq for InFlight<P> {
    fn eq(&self, other: &Self) -> bool {
        (self.arrive_ns, self.seq) == (other.arrive_ns, other.seq)
    }
}
impl<P> Eq for InFlight<P> {}
impl<P> PartialOrd for InFlight<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<P> Ord for InFlight<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.arrive_ns, self.seq).cmp(&(other.arrive_ns, other.seq))
    }
}

/// One link direction: loss on entry, a drop-tail queue drained by a serialization clock,
/// then a delay line with jitter. Time is an argument (nanoseconds on any monotonic clock).
///
/// ```text
/// offer ─▶ loss? ─▶ [drop-tail queue] ─serialize at rate─▶ [delay line: +delay ± jitter] ─▶ poll_deliver
/// ```
///
/// Queue occupancy follows dummynet: a packet counts until its serialization ends. The head
/// packet's departure is fixed when it reaches the head, so a reconfiguration never drops or
/// re-times a packet already on the wire; later packets use the new settings.
#[derive(Debug)]
pub struct Link<P> {
    cfg: DirectionConfig,
    rng: Rng,
    ge_bad: bool,
    queue: VecDeque<Waiting<P>>,
    queued_bytes: u64,
    head_depart_ns: Option<u64>,
    link_free_ns: u64,
    delay_line: BinaryHeap<Reverse<InFlight<P>>>,
    last_arrive_ns: u64,
    seq: u64,
    counters: Counters,
    sojourn: Histogram,
    lateness: Histogram,
}

impl<P> Link<P> {
    /// `cfg` must have passed [`DirectionConfig::validate`].
    pub fn new(cfg: DirectionConfig, seed: u64) -> Self {
        Self {
            cfg,
            rng: Rng::new(seed),
            ge_bad: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            head_depart_ns: None,
            link_free_ns: 0,
            delay_line: BinaryHeap::new(),
            last_arrive_ns: 0,
            seq: 0,
            counters: Counters::default(),
            sojourn: Histogram::default(),
            lateness: Histogram::default(),
        }
    }

    pub fn config(&self) -> &DirectionConfig {
        &self.cfg
    }

    /// Replaces the settings; queued and in-flight packets are kept.
    pub fn set_config(&mut self, now_ns: u64, cfg: DirectionConfig) {
        self.advance(now_ns);
        if !matches!(cfg.loss, LossModel::GilbertElliott { .. }) {
            self.ge_bad = false;
        }
        self.cfg = cfg;
    }

    fn tx_ns(&self, len: u32) -> u64 {
        if self.cfg.rate_bps == 0 {
            return 0;
        }
        // Rounded up, so the link never runs faster than configured.
        (u64::from(len) * 8 * 1_000_000_000).div_ceil(self.cfg.rate_bps)
    }

    fn draw_loss(&mut self) -> bool {
        match self.cfg.loss {
            LossModel::None => false,
            LossModel::Bernoulli { p } => self.rng.chance(p),
            LossModel::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_bad,
                loss_in_good,
            } => {
                let flip = if self.ge_bad {
                    p_bad_to_good
                } else {
                    p_good_to_bad
                };
                if self.rng.chance(flip) {
                    self.ge_bad = !self.ge_bad;
                }
                self.rng.chance(if self.ge_bad {
                    loss_in_bad
                } else {
                    loss_in_good
                })
            }
        }
    }

    fn draw_delay_ns(&mut self) -> u64 {
        let base = self.cfg.delay_us as f64 * 1e3;
        let j = self.cfg.jitter_us as f64 * 1e3;
        if j == 0.0 {
            return base as u64;
        }
        let offset = match self.cfg.jitter_shape {
            JitterShape::Uniform => (self.rng.next_f64() * 2.0 - 1.0) * j,
            JitterShape::Normal => (self.rng.next_normal() * j).clamp(-3.0 * j, 3.0 * j),
        };
        (base + offset).max(0.0) as u64
    }

    /// Moves every packet whose serialization has ended by `now_ns` into the delay line.
    fn advance(&mut self, now_ns: u64) {
        while let Some(head) = self.queue.front() {
            let depart = match self.head_depart_ns {
                Some(d) => d,
                None => {
                    let d = head.enq_ns.max(self.link_free_ns) + self.tx_ns(head.len);
                    self.head_depart_ns = Some(d);
                    d
                }
            };
            if depart > now_ns {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            self.head_depart_ns = None;
            self.link_free_ns = depart;
            self.queued_bytes -= u64::from(w.len);
            let mut arrive = depart + self.draw_delay_ns();
            if !self.cfg.reorder {
                arrive = arrive.max(self.last_arrive_ns);
            }
            self.last_arrive_ns = self.last_arrive_ns.max(arrive);
            self.seq += 1;
            self.delay_line.push(Reverse(InFlight {
                arrive_ns: arrive,
                seq: self.seq,
                enq_ns: w.enq_ns,
                len: w.len,
                pkt: w.pkt,
            }));
        }
    }

    /// Offers a packet of `len` bytes at `now_ns`.
    pub fn offer(&mut self, now_ns: u64, len: u32, pkt: P) -> Offer<P> {
        self.advance(now_ns);
        let c = &mut self.counters;
        c.offered_packets += 1;
        c.offered_bytes += u64::from(len);
        if self.draw_loss() {
            self.counters.random_drop_packets += 1;
            self.counters.random_drop_bytes += u64::from(len);
            return Offer::RandomDrop(pkt);
        }
        if self.queued_bytes + u64::from(len) > self.cfg.queue_limit_bytes
            || self.queue.len() >= self.cfg.queue_limit_packets as usize
        {
            self.counters.queue_drop_packets += 1;
            self.counters.queue_drop_bytes += u64::from(len);
            return Offer::QueueDrop(pkt);
        }
        self.queue.push_back(Waiting {
            enq_ns: now_ns,
            len,
            pkt,
        });
        self.queued_bytes += u64::from(len);
        self.counters.max_queue_bytes = self.counters.max_queue_bytes.max(self.queued_bytes);
        Offer::Accepted
    }

    /// Returns the next packet due for delivery at `now_ns`, in delivery order.
    pub fn poll_deliver(&mut self, now_ns: u64) -> Option<P> {
        self.advance(now_ns);
        if self.delay_line.peek()?.0.arrive_ns > now_ns {
            return None;
        }
        let Reverse(f) = self.delay_line.pop()?;
        self.counters.forwarded_packets += 1;
        self.counters.forwarded_bytes += u64::from(f.len);
        self.sojourn.record((now_ns - f.enq_ns) / 1_000);
        self.lateness.record((now_ns - f.arrive_ns) / 1_000);
        Some(f.pkt)
    }

    /// Earliest time at which `poll_deliver` can return a packet, if any is held.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let head = self.queue.front().map(|h| {
            self.head_depart_ns
                .unwrap_or_else(|| h.enq_ns.max(self.link_free_ns) + self.tx_ns(h.len))
        });
        let line = self.delay_line.peek().map(|f| f.0.arrive_ns);
        match (head, line) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Packets held (queued or in the delay line).
    pub fn held_packets(&self) -> usize {
        self.queue.len() + self.delay_line.len()
    }

    pub fn stats(&self) -> DirectionStats {
        DirectionStats {
            counters: self.counters.clone(),
            queued_packets: self.queue.len() as u64,
            queued_bytes: self.queued_bytes,
            in_flight_packets: self.delay_line.len() as u64,
            sojourn: self.sojourn.summary(),
            lateness: self.lateness.summary(),
        }
    }
}
