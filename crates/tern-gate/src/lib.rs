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
//! Several tiers (PipeCloud §multi-tier): a [`Group`] of gated VMs stamps the frames its
//! members send each other with a clock trailer; a frame leaving the group waits for every
//! member disk it depends on ([`Clock`], [`Gate::outbound_clock`]).
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

/// A vector clock over a protected group's disks: entry `i` counts writes of member `i`
/// (entry 0: the VM's own disk; see [`Group`]). A missing entry is 0.
pub type Clock = Vec<u64>;

#[derive(Debug)]
struct Held {
    tag: Clock,
    since_ns: u64,
    frame: Vec<u8>,
}

#[derive(Debug)]
pub struct Gate {
    held: VecDeque<Held>,
    held_bytes: usize,
    limit_bytes: usize,
    committed: Clock,
    stats: GateStats,
}

impl Gate {
    pub fn new(limit_bytes: usize) -> Gate {
        Gate {
            held: VecDeque::new(),
            held_bytes: 0,
            limit_bytes,
            committed: vec![0],
            stats: GateStats::default(),
        }
    }

    /// The committed counter of the VM's own disk.
    pub fn committed(&self) -> u64 {
        self.committed[0]
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            held_now: self.held.len() as u64,
            held_bytes_now: self.held_bytes as u64,
            committed: self.committed[0],
            ..self.stats.clone()
        }
    }

    /// A frame leaving the protected group, sent when the VM had issued `tag` writes.
    pub fn outbound(&mut self, now_ns: u64, tag: u64, frame: Vec<u8>) -> Outcome {
        self.outbound_clock(now_ns, vec![tag], frame)
    }

    /// A frame leaving the protected group that depends on the writes counted by `tag`.
    pub fn outbound_clock(&mut self, now_ns: u64, tag: Clock, frame: Vec<u8>) -> Outcome {
        if self.held.is_empty() && self.covers(&tag) {
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

    /// The backup's committed counter of the VM's own disk; it only moves forward (smaller
    /// values are ignored).
    pub fn commit(&mut self, committed: u64) {
        self.commit_member(0, committed);
    }

    /// The committed counter of group member `i`'s disk (forward only).
    pub fn commit_member(&mut self, i: usize, committed: u64) {
        if self.committed.len() <= i {
            self.committed.resize(i + 1, 0);
        }
        self.committed[i] = self.committed[i].max(committed);
    }

    fn covers(&self, tag: &[u64]) -> bool {
        tag.iter()
            .enumerate()
            .all(|(i, &t)| t <= self.committed.get(i).copied().unwrap_or(0))
    }

    /// The next frame whose tag is committed, in arrival order.
    pub fn poll_release(&mut self, now_ns: u64) -> Option<Vec<u8>> {
        if !self.covers(&self.held.front()?.tag) {
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

    /// The tag of the oldest held frame: the clock the gate waits for.
    pub fn waiting_for(&self) -> Option<&[u64]> {
        self.held.front().map(|h| h.tag.as_slice())
    }
}

pub type Mac = [u8; 6];

/// Marks the end of a frame that carries a clock trailer.
pub const CLOCK_MAGIC: [u8; 4] = *b"TCK1";
/// Most entries in one trailer (members of a protected group).
pub const MAX_MEMBERS: usize = 16;
/// Bytes per trailer entry: MAC, LE u64 count.
const ENTRY_BYTES: usize = 14;

/// Appends a clock trailer (`n x (mac | le64 count) | n: u8 | "TCK1"`) to an Ethernet frame.
/// Only frames between gated members of one group carry it: the sending gate appends it,
/// the receiving gate strips it before the guest sees the frame (switch and overlay forward
/// it as part of the frame).
pub fn append_clock(frame: &mut Vec<u8>, entries: &[(Mac, u64)]) {
    let entries = &entries[..entries.len().min(MAX_MEMBERS)];
    for (mac, n) in entries {
        frame.extend_from_slice(mac);
        frame.extend_from_slice(&n.to_le_bytes());
    }
    frame.push(entries.len() as u8);
    frame.extend_from_slice(&CLOCK_MAGIC);
}

/// Removes a clock trailer from `frame` and returns its entries; `None` (frame untouched)
/// when it has none or a malformed one.
pub fn strip_clock(frame: &mut Vec<u8>) -> Option<Vec<(Mac, u64)>> {
    let len = frame.len();
    if len < 14 + 5 || frame[len - 4..] != CLOCK_MAGIC {
        return None;
    }
    let n = frame[len - 5] as usize;
    let body = n * ENTRY_BYTES + 5;
    if n > MAX_MEMBERS || len < 14 + body {
        return None;
    }
    let start = len - body;
    let entries = frame[start..len - 5]
        .chunks_exact(ENTRY_BYTES)
        .map(|e| {
            let mac: Mac = e[..6].try_into().expect("entry size");
            let n = u64::from_le_bytes(e[6..].try_into().expect("entry size"));
            (mac, n)
        })
        .collect();
    frame.truncate(start);
    Some(entries)
}

/// One gated VM's view of its protected group (PipeCloud's multi-tier tracking, sans-IO):
/// which destinations are group members (their frames are not gated but carry our clock),
/// and the highest write counts of each peer's disk our VM has seen frames depend on.
#[derive(Debug, Clone)]
pub struct Group {
    me: Mac,
    peers: Vec<Mac>,
    /// Per peer: the highest count of its disk a frame delivered to our VM depended on.
    deps: Vec<u64>,
}

impl Group {
    pub fn new(me: Mac, peers: Vec<Mac>) -> Group {
        let mut peers = peers;
        peers.retain(|p| *p != me);
        peers.truncate(MAX_MEMBERS - 1);
        let deps = vec![0; peers.len()];
        Group { me, peers, deps }
    }

    /// Our VM's MAC.
    pub fn me(&self) -> Mac {
        self.me
    }

    pub fn peers(&self) -> &[Mac] {
        &self.peers
    }

    /// Whether a frame to `dst` stays inside the group.
    pub fn is_peer(&self, dst: &Mac) -> bool {
        self.peers.contains(dst)
    }

    /// The clock of what our VM sends now, having issued `own_writes` writes: entry 0 is
    /// our disk, entry `i + 1` peer `i`'s (the order [`Gate::commit_member`] is fed in).
    pub fn clock(&self, own_writes: u64) -> Clock {
        std::iter::once(own_writes)
            .chain(self.deps.iter().copied())
            .collect()
    }

    /// What our VM's next writes depend on: (peer MAC, highest write count of its disk).
    pub fn deps(&self) -> Vec<(Mac, u64)> {
        self.peers
            .iter()
            .copied()
            .zip(self.deps.iter().copied())
            .collect()
    }

    /// Stamps a frame our VM sends to a peer with our clock (by MAC).
    pub fn stamp(&self, frame: &mut Vec<u8>, own_writes: u64) {
        let mut e = vec![(self.me, own_writes)];
        e.extend(self.peers.iter().copied().zip(self.deps.iter().copied()));
        append_clock(frame, &e);
    }

    /// A frame arriving for our VM: if a peer sent it to us, strips its trailer and takes
    /// the clock in (entries for our own disk are ours already). Call before the VM sees it.
    ///
    /// `from_owner`: the switch vouches that the frame entered through the gated port bound
    /// to its source MAC (`tern_node::switch::Switch::trusted_source`, the mark on the
    /// gate's switch socket). A source MAC alone proves nothing (any port can send any
    /// bytes), so without it the frame is left untouched and its clock ignored: a forged
    /// trailer could otherwise raise a dependency so far that the gate never opens.
    pub fn receive(&mut self, frame: &mut Vec<u8>, from_owner: bool) -> bool {
        if !from_owner
            || frame.len() < 14
            || frame[..6] != self.me[..]
            || !self.peers.iter().any(|p| frame[6..12] == p[..])
        {
            return false;
        }
        let Some(entries) = strip_clock(frame) else {
            return false;
        };
        for (mac, n) in entries {
            if let Some(i) = self.peers.iter().position(|p| *p == mac) {
                self.deps[i] = self.deps[i].max(n);
            }
        }
        true
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
        assert_eq!(g.waiting_for(), Some(&[2u64][..]));
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

    #[test]
    fn clock_trailers_round_trip_and_bad_ones_are_left_alone() {
        let base: Vec<u8> = (0..60u8).collect();
        let mut f = base.clone();
        append_clock(&mut f, &[([1; 6], 7), ([2; 6], u64::MAX)]);
        assert_eq!(f.len(), 60 + 2 * 14 + 5);
        assert_eq!(
            strip_clock(&mut f),
            Some(vec![([1; 6], 7), ([2; 6], u64::MAX)])
        );
        assert_eq!(f, base);
        assert_eq!(strip_clock(&mut f), None, "no trailer");
        for bad in [
            [&base[..20], &[3u8], &CLOCK_MAGIC[..]].concat(), // claims 3 entries, too short
            [&base[..10], &[0u8], &CLOCK_MAGIC[..]].concat(), // too short for a frame
            [&base[..], &[17u8], &CLOCK_MAGIC[..]].concat(),
        ] {
            let mut b = bad.clone();
            assert_eq!(strip_clock(&mut b), None);
            assert_eq!(b, bad);
        }
    }

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        [&dst[..], &src[..], &[0x08, 0x00], &[0u8; 46][..]].concat()
    }

    /// Two tiers: the database's reply to the front end passes at once carrying the
    /// database's count; the front end's reply to the client waits for the database's
    /// disk, not only its own.
    #[test]
    fn a_front_end_reply_waits_for_the_database_writes_it_saw() {
        let (fe, db, client) = ([0xfe; 6], [0xdb; 6], [0xc1; 6]);
        let mut fe_g = Group::new(fe, vec![db, fe]);
        let db_g = Group::new(db, vec![fe]);
        assert_eq!(fe_g.peers(), &[db]);
        assert!(db_g.is_peer(&fe) && !db_g.is_peer(&client));
        // The database wrote 5 times, then replies to the front end.
        let mut reply = frame(fe, db);
        db_g.stamp(&mut reply, 5);
        assert!(fe_g.receive(&mut reply, true));
        assert_eq!(reply, frame(fe, db), "the guest sees the frame unchanged");
        // A frame from a non-member keeps its bytes, trailer-looking or not.
        let mut other = frame(fe, client);
        append_clock(&mut other, &[(db, 99)]);
        let copy = other.clone();
        assert!(!fe_g.receive(&mut other, true));
        assert_eq!(other, copy);
        let tag = fe_g.clock(0);
        assert_eq!(tag, vec![0, 5]);
        let mut gate = Gate::new(1 << 20);
        assert_eq!(
            gate.outbound_clock(0, tag, frame(client, fe)),
            Outcome::Held
        );
        gate.commit(10); // the front end's own disk is far ahead: not enough
        assert_eq!(gate.poll_release(1), None);
        gate.commit_member(1, 4);
        assert_eq!(gate.poll_release(2), None);
        gate.commit_member(1, 5);
        assert_eq!(gate.poll_release(3), Some(frame(client, fe)));
        // Counts only grow: an older stamp does not lower the dependency.
        let mut old = frame(fe, db);
        db_g.stamp(&mut old, 2);
        fe_g.receive(&mut old, true);
        assert_eq!(fe_g.clock(1), vec![1, 5]);
    }

    /// Another VM (or the TAP) sends the front end a frame with the database's MAC as
    /// source and a trailer claiming a huge database count. It did not come through the
    /// database's gated port, so it is not taken in and the front end's reply to the client
    /// is released once the writes it really depends on are committed.
    #[test]
    fn a_spoofed_trailer_is_not_taken_in() {
        let (fe, db, client) = ([0xfe; 6], [0xdb; 6], [0xc1; 6]);
        let mut fe_g = Group::new(fe, vec![db]);
        let db_g = Group::new(db, vec![fe]);
        let mut real = frame(fe, db);
        db_g.stamp(&mut real, 3);
        assert!(fe_g.receive(&mut real, true));
        let mut spoof = frame(fe, db);
        append_clock(&mut spoof, &[(db, u64::MAX)]);
        let copy = spoof.clone();
        assert!(!fe_g.receive(&mut spoof, false));
        assert_eq!(spoof, copy, "left untouched");
        // Not addressed to our VM (a broadcast): a gate only stamps frames to a peer.
        let mut bcast = frame([0xff; 6], db);
        db_g.stamp(&mut bcast, 1 << 40);
        assert!(!fe_g.receive(&mut bcast, true));
        assert_eq!(fe_g.clock(0), vec![0, 3]);
        let mut gate = Gate::new(1 << 20);
        let tag = fe_g.clock(0);
        assert_eq!(
            gate.outbound_clock(0, tag, frame(client, fe)),
            Outcome::Held
        );
        gate.commit_member(1, 3);
        assert_eq!(gate.poll_release(1), Some(frame(client, fe)));
    }
}
