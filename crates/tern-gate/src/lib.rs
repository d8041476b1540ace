//! PipeCloud's output gate (sans-IO).
//!
//! A protected VM's disk writes are replicated asynchronously; what must not happen is a
//! client seeing a reply that depended on a write the backup does not have. So every frame
//! the VM sends out of its protected group is tagged with the VM's *write counter* at the
//! moment it was sent (writes the VM had issued, `tern_disk::primary::Primary::writes`), and
//! leaves only once the backup's *committed counter* (`committed_writes`) reaches the tag.
//! Inbound frames are never held.
//!
//! ```text
//!  outbound(tag, frame) ──tag <= committed and nothing held──▶ Release (at once)
//!        │ otherwise
//!        ▼
//!   held FIFO (bounded: LIMIT bytes) ──commit(c) / poll_release──▶ released in order
//!        │ full
//!        ▼
//!   Dropped (counted): the guest's TCP retransmits it, by when the gate has usually opened
//! ```
//!
//! Frames leave in the order they arrived (a later frame never overtakes a held one, even if
//! its own tag is committed), so the gate adds no reordering. Time is an argument; nothing
//! here reads a clock.

use std::collections::{BTreeSet, VecDeque};

use serde::Serialize;

/// Default bound on held bytes per gate (about 4 ms of a 1 Gbit/s link, 2.6 ms at 100 Mbit/s
/// per MiB; PipeCloud held at most one RTT of output).
pub const DEFAULT_LIMIT_BYTES: usize = 4 << 20;
/// Out-of-order acknowledgements a [`Commits`] remembers before refusing more.
pub const MAX_PENDING_ACKS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send it now.
    Release(Vec<u8>),
    /// Held until the committed counter reaches its tag.
    Held,
    /// The gate is full; the frame is gone (counted).
    Dropped,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GateStats {
    pub passed: u64,
    pub held: u64,
    pub released: u64,
    pub dropped: u64,
    pub held_now: u64,
    pub held_bytes_now: u64,
    /// Total and largest time frames spent held, ns.
    pub hold_ns_sum: u64,
    pub hold_ns_max: u64,
    pub committed: u64,
}

#[derive(Debug)]
struct Held {
    tag: u64,
    since_ns: u64,
    frame: Vec<u8>,
}

#[derive(Debug)]
pub struct Gate {
    held: VecDeque<Held>,
    held_bytes: usize,
    limit_bytes: usize,
    committed: u64,
    stats: GateStats,
}

impl Gate {
    pub fn new(limit_bytes: usize) -> Gate {
        Gate {
            held: VecDeque::new(),
            held_bytes: 0,
            limit_bytes,
            committed: 0,
            stats: GateStats::default(),
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            held_now: self.held.len() as u64,
            held_bytes_now: self.held_bytes as u64,
            committed: self.committed,
            ..self.stats.clone()
        }
    }

    /// A frame leaving the protected group, sent when the VM had issued `tag` writes.
    pub fn outbound(&mut self, now_ns: u64, tag: u64, frame: Vec<u8>) -> Outcome {
        if self.held.is_empty() && tag <= self.committed {
            self.stats.passed += 1;
            return Outcome::Release(frame);
        }
        if self.held_bytes + frame.len() > self.limit_bytes {
            self.stats.dropped += 1;
            return Outcome::Dropped;
        }
        self.held_bytes += frame.len();
        self.stats.held += 1;
        self.held.push_back(Held {
            tag,
            since_ns: now_ns,
            frame,
        });
        Outcome::Held
    }

    /// The backup's committed counter; it only moves forward (smaller values are ignored).
    pub fn commit(&mut self, committed: u64) {
        self.committed = self.committed.max(committed);
    }

    /// The next frame whose tag is committed, in arrival order.
    pub fn poll_release(&mut self, now_ns: u64) -> Option<Vec<u8>> {
        if self.held.front()?.tag > self.committed {
            return None;
        }
        let h = self.held.pop_front()?;
        self.held_bytes -= h.frame.len();
        let waited = now_ns.saturating_sub(h.since_ns);
        self.stats.released += 1;
        self.stats.hold_ns_sum += waited;
        self.stats.hold_ns_max = self.stats.hold_ns_max.max(waited);
        Some(h.frame)
    }

    /// The smallest tag still held: the counter the gate waits for.
    pub fn waiting_for(&self) -> Option<u64> {
        self.held.front().map(|h| h.tag)
    }
}

/// A committed counter fed by acknowledgements that may arrive out of order (several paths
/// or disks): it advances only over a gap-free prefix.
#[derive(Debug, Default)]
pub struct Commits {
    committed: u64,
    ahead: BTreeSet<u64>,
}

impl Commits {
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Write `n` is durable at the backup. Returns the committed counter. `Err` when more
    /// than [`MAX_PENDING_ACKS`] acknowledgements wait for a gap.
    pub fn ack(&mut self, n: u64) -> Result<u64, u64> {
        if n <= self.committed {
            return Ok(self.committed);
        }
        if n == self.committed + 1 {
            self.committed = n;
            while self.ahead.remove(&(self.committed + 1)) {
                self.committed += 1;
            }
        } else {
            if self.ahead.len() >= MAX_PENDING_ACKS {
                return Err(self.committed);
            }
            self.ahead.insert(n);
        }
        Ok(self.committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wait_for_their_writes_and_leave_in_order() {
        let mut g = Gate::new(1000);
        assert_eq!(g.outbound(0, 0, vec![1]), Outcome::Release(vec![1]));
        assert_eq!(g.outbound(1, 2, vec![2]), Outcome::Held);
        // Committed already, but a held frame is ahead of it: no overtaking.
        assert_eq!(g.outbound(2, 0, vec![3]), Outcome::Held);
        assert_eq!(g.poll_release(3), None);
        g.commit(1);
        assert_eq!(g.poll_release(4), None);
        assert_eq!(g.waiting_for(), Some(2));
        g.commit(2);
        g.commit(1); // never backwards
        assert_eq!(g.committed(), 2);
        assert_eq!(g.poll_release(11), Some(vec![2]));
        assert_eq!(g.poll_release(12), Some(vec![3]));
        assert_eq!(g.poll_release(13), None);
        let st = g.stats();
        assert_eq!((st.passed, st.held, st.released, st.dropped), (1, 2, 2, 0));
        assert_eq!(st.hold_ns_max, 10);
        assert_eq!(st.held_now, 0);
    }

    #[test]
    fn a_full_gate_drops_and_says_so() {
        let mut g = Gate::new(10);
        assert_eq!(g.outbound(0, 5, vec![0; 6]), Outcome::Held);
        assert_eq!(g.outbound(0, 5, vec![0; 6]), Outcome::Dropped);
        assert_eq!(g.outbound(0, 5, vec![0; 4]), Outcome::Held);
        assert_eq!(g.stats().dropped, 1);
        assert_eq!(g.stats().held_bytes_now, 10);
        g.commit(5);
        assert!(g.poll_release(1).is_some());
        assert!(g.poll_release(1).is_some());
        assert_eq!(g.stats().held_bytes_now, 0);
    }

    #[test]
    fn commits_fill_gaps_before_advancing() {
        let mut c = Commits::default();
        assert_eq!(c.ack(2), Ok(0));
        assert_eq!(c.ack(4), Ok(0));
        assert_eq!(c.ack(1), Ok(2));
        assert_eq!(c.ack(3), Ok(4));
        assert_eq!(c.ack(3), Ok(4));
        assert_eq!(c.committed(), 4);
    }

    /// The property the gate exists for, over random schedules: no frame is released while
    /// its tag is above the committed counter, and frames leave in arrival order (drops
    /// only skip).
    #[test]
    fn never_releases_ahead_of_the_committed_counter() {
        let mut x = 0x2545f4914f6cdd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let mut g = Gate::new(64);
            let (mut writes, mut committed, mut next_id) = (0u64, 0u64, 0u32);
            let mut tags = Vec::new();
            let mut released: Vec<u32> = Vec::new();
            let check = |g: &Gate, f: Vec<u8>, released: &mut Vec<u32>, tags: &[u64]| {
                let id = u32::from_le_bytes(f[..4].try_into().unwrap());
                assert!(
                    tags[id as usize] <= g.committed(),
                    "released ahead of its writes"
                );
                assert!(released.last().is_none_or(|&l| l < id), "reordered");
                released.push(id);
            };
            for t in 0..500u64 {
                match rnd(4) {
                    0 => writes += 1,
                    1 => {
                        committed = (committed + rnd(3)).min(writes);
                        g.commit(committed);
                    }
                    2 => {
                        tags.push(writes);
                        let frame = [next_id.to_le_bytes().to_vec(), vec![0; 12]].concat();
                        if let Outcome::Release(f) = g.outbound(t, writes, frame) {
                            check(&g, f, &mut released, &tags);
                        }
                        next_id += 1;
                    }
                    _ => {
                        while let Some(f) = g.poll_release(t) {
                            check(&g, f, &mut released, &tags);
                        }
                    }
                }
            }
        }
    }
}
