//! Deterministic simulation of replication: the primary and secondary cores over a byte
//! channel that delivers in random pieces and breaks at random moments, with in-memory
//! volumes, guest writes racing the scan, and a secondary that crashes (losing what it had
//! not made durable). After the last write and a final session, the volumes must be equal
//! byte for byte. A failing run prints its seed.

use tern_disk::primary::{Phase, Primary};
use tern_disk::secondary::{Event, Op, Secondary};
use tern_disk::{BLOCK_BYTES, Mode, block_hash, chunk_hash, zero_hash};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The secondary's volume: what is durable and what only sits in its page cache.
struct SecVol {
    durable: Vec<u8>,
    live: Vec<u8>,
}

fn hashes(v: &[u8]) -> Vec<u64> {
    v.chunks(BLOCK_BYTES as usize).map(chunk_hash).collect()
}

fn check(s: &mut Secondary, v: &[u8], offset: u64, theirs: &[u64]) {
    let end = (offset + BLOCK_BYTES).min(v.len() as u64) as usize;
    let mine = tern_disk::volume::chunk_hashes_of(&v[offset as usize..end]);
    s.check_answer(offset, theirs, &mine);
}

fn apply(v: &mut [u8], op: &Op) {
    match op {
        Op::Write { offset, data } => {
            v[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
        }
        Op::Zero { offset, len } => v[*offset as usize..(*offset + *len) as usize].fill(0),
        Op::Copy { offset, src, len } => {
            let s = *src as usize;
            v.copy_within(s..s + *len as usize, *offset as usize)
        }
    }
}

struct World {
    rng: Rng,
    size: usize,
    pvol: Vec<u8>,
    svol: SecVol,
    p: Primary,
    s: Secondary,
    to_s: Vec<u8>,
    to_p: Vec<u8>,
    consistent: bool,
    wire_bytes: u64,
    /// Every guest write: (offset, bytes), in order (write i+1 is counter i+1).
    history: Vec<(usize, Vec<u8>)>,
}

impl World {
    fn new(seed: u64, size: usize, mode: Mode, older_copy: bool) -> World {
        let mut rng = Rng(seed | 1);
        let mut pvol = vec![0u8; size];
        // Some data, some duplicated chunks, some zero runs.
        for c in 0..size / 4096 {
            match rng.below(10) {
                0..=3 => {}
                4..=6 => {
                    let b = rng.next() as u8;
                    pvol[c * 4096..(c + 1) * 4096].fill(b);
                }
                _ => {
                    for x in &mut pvol[c * 4096..(c + 1) * 4096] {
                        *x = rng.next() as u8;
                    }
                }
            }
        }
        let svol = if older_copy {
            let mut v = pvol.clone();
            for _ in 0..8 {
                let o = rng.below(size as u64 - 100) as usize;
                v[o..o + 100].fill(0xee);
            }
            v
        } else {
            vec![0u8; size]
        };
        let mut p = Primary::new(size as u64, "sim", mode);
        p.max_backlog = 256 << 10;
        World {
            rng,
            size,
            pvol,
            svol: SecVol {
                durable: svol.clone(),
                live: svol,
            },
            p,
            s: Secondary::new(size as u64),
            to_s: Vec::new(),
            to_p: Vec::new(),
            consistent: true,
            wire_bytes: 0,
            history: Vec::new(),
        }
    }

    fn connect(&mut self) {
        self.to_s.clear();
        self.to_p.clear();
        self.s = Secondary::new(self.size as u64);
        self.p.connect();
    }

    /// Now and then (0.3 % of steps) the link is cut, rarely (0.3 % of those) with a
    /// secondary crash, and the primary reconnects.
    fn maybe_cut(&mut self) {
        if self.rng.chance(3) {
            let crash = self.rng.chance(300);
            self.cut(crash);
            self.connect();
        }
    }

    fn cut(&mut self, crash_secondary: bool) {
        self.p.disconnect("cut");
        if crash_secondary {
            self.svol.live = self.svol.durable.clone();
        }
    }

    fn guest_write(&mut self) {
        let r = &mut self.rng;
        let len = 1 + r.below(20_000) as usize;
        let off = r.below((self.size - len) as u64) as usize;
        if r.chance(200) {
            self.pvol[off..off + len].fill(0);
            self.p.zero(off as u64, len as u64);
        } else {
            let b = r.next() as u8;
            let dup = r.chance(300);
            for (i, x) in self.pvol[off..off + len].iter_mut().enumerate() {
                *x = if dup {
                    b
                } else {
                    b.wrapping_add((i * 7) as u8)
                };
            }
            self.p.write(off as u64, &self.pvol[off..off + len]);
        }
        self.history.push((off, self.pvol[off..off + len].to_vec()));
        assert_eq!(self.p.writes(), self.history.len() as u64);
    }

    /// PipeCloud's promise: every write counted as committed is durable at the secondary.
    /// A byte a committed write touched holds that write's value or a later write's (never
    /// an older one). Checked at both ends of every committed write.
    fn check_committed(&self, seed: u64) {
        let c = self.p.committed_writes() as usize;
        assert!(c <= self.history.len());
        for (i, (off, data)) in self.history[..c].iter().enumerate() {
            for b in [*off, off + data.len() - 1] {
                let ok = self.history[i..]
                    .iter()
                    .filter(|(o, d)| *o <= b && b < o + d.len())
                    .any(|(o, d)| d[b - o] == self.svol.durable[b]);
                assert!(
                    ok,
                    "seed {seed}: write {} of {c} committed but byte {b} is not durable",
                    i + 1
                );
            }
        }
    }

    fn scan_step(&mut self) {
        if let Some((off, len)) = self.p.next_reread() {
            let o = off as usize;
            let data = self.pvol[o..o + len].to_vec();
            self.p.reread(off, &data);
        }
        if let Some((off, len)) = self.p.next_scan() {
            let o = off as usize;
            if self.pvol[o..o + len].iter().all(|&x| x == 0) && self.rng.chance(500) {
                // As the driver does for holes.
                self.p.scanned_hole(off / BLOCK_BYTES + 1);
            } else {
                let data = self.pvol[o..o + len].to_vec();
                self.p.scanned(off, &data);
            }
        }
    }

    fn deliver(&mut self) {
        let out = self.p.take_output();
        self.to_s.extend(out);
        if !self.to_s.is_empty() {
            let n = 1 + self.rng.below(self.to_s.len() as u64) as usize;
            let piece: Vec<u8> = self.to_s.drain(..n).collect();
            self.wire_bytes += piece.len() as u64;
            let (events, err) = self.s.handle_input(&piece);
            for e in events {
                match e {
                    Event::NeedHashes { .. } => {
                        self.consistent = false;
                        self.s.ready(false);
                        let h = hashes(&self.svol.live);
                        self.s.hashes(&h);
                    }
                    Event::Apply { op, .. } => apply(&mut self.svol.live, &op),
                    Event::Clock { .. } => {}
                    Event::Check { offset, hashes } => {
                        check(&mut self.s, &self.svol.live, offset, &hashes)
                    }
                    Event::SyncNow { seq } => self.make_durable(seq),
                    Event::Consistent => unreachable!("only from durable()"),
                }
            }
            if err.is_some() {
                panic!("secondary refused: {err:?}");
            }
            if self.to_s.is_empty() && self.s.dirty() {
                let seq = self.s.last_seq();
                self.make_durable(seq);
            }
        }
        let back = self.s.take_output();
        self.to_p.extend(back);
        if !self.to_p.is_empty() {
            let n = 1 + self.rng.below(self.to_p.len() as u64) as usize;
            let piece: Vec<u8> = self.to_p.drain(..n).collect();
            self.p.handle_input(&piece).expect("primary accepts");
        }
    }

    fn make_durable(&mut self, seq: u64) {
        self.svol.durable.copy_from_slice(&self.svol.live);
        if let Some(Event::Consistent) = self.s.durable(seq) {
            self.consistent = true;
        }
    }
}

fn run(seed: u64, mode: Mode, older_copy: bool, cuts: bool) -> (World, u64) {
    let mut w = World::new(seed, 3 << 20, mode, older_copy);
    w.connect();
    let mut steps = 0u64;
    for _ in 0..6000 {
        steps += 1;
        match w.rng.below(10) {
            0 => w.guest_write(),
            1..=4 => w.scan_step(),
            _ => w.deliver(),
        }
        if steps % 50 == 0 {
            w.check_committed(seed);
        }
        if cuts && w.rng.chance(2) {
            let crash = w.rng.chance(500);
            w.cut(crash);
            w.connect();
        }
    }
    // Quiesce: no more writes, one last session runs to completion.
    let mut guard = 0;
    while !(w.p.in_sync() && w.to_s.is_empty() && w.to_p.is_empty() && !w.p.has_output()) {
        if w.p.phase() == Phase::Disconnected {
            w.connect();
        }
        w.scan_step();
        w.deliver();
        guard += 1;
        assert!(guard < 200_000, "seed {seed}: no convergence");
    }
    (w, steps)
}

#[test]
fn replicas_converge_under_cuts_crashes_and_racing_writes() {
    for seed in 1..=24u64 {
        for (mode, older, cuts) in [
            (Mode::Async, false, true),
            (Mode::Auto, true, true),
            (Mode::Sync, false, false),
        ] {
            let (w, _) = run(seed * 7919, mode, older, cuts);
            assert!(
                w.pvol == w.svol.durable,
                "seed {seed} mode {mode} older {older} cuts {cuts}: volumes differ"
            );
            assert!(w.consistent, "seed {seed}: secondary not consistent");
            // Quiet and in sync: everything written is committed.
            w.check_committed(seed);
            assert_eq!(
                w.p.committed_writes(),
                w.history.len() as u64,
                "seed {seed}"
            );
        }
    }
}

#[test]
fn same_seed_same_trace() {
    let (a, _) = run(42, Mode::Async, true, true);
    let (b, _) = run(42, Mode::Async, true, true);
    assert_eq!(a.wire_bytes, b.wire_bytes);
    assert_eq!(a.pvol, b.pvol);
}

/// One whole session with nothing lost or reordered: returns the primary's bytes.
fn sync_in_lockstep(p: &mut Primary, vol: &[u8], sec: &mut [u8]) -> u64 {
    let mut s = Secondary::new(vol.len() as u64);
    p.connect();
    let mut wire = 0u64;
    loop {
        while let Some((off, len)) = p.next_reread().or(p.next_scan()) {
            let o = off as usize;
            if p.next_reread().is_some() {
                p.reread(off, &vol[o..o + len]);
            } else {
                p.scanned(off, &vol[o..o + len]);
            }
        }
        let out = p.take_output();
        if out.is_empty() && p.in_sync() {
            return wire;
        }
        wire += out.len() as u64;
        let (ev, err) = s.handle_input(&out);
        assert!(err.is_none(), "{err:?}");
        for e in ev {
            match e {
                Event::NeedHashes { .. } => {
                    s.ready(false);
                    s.hashes(&hashes(sec));
                }
                Event::Apply { op, .. } => apply(sec, &op),
                Event::Clock { .. } => {}
                Event::Check { offset, hashes } => check(&mut s, sec, offset, &hashes),
                Event::SyncNow { .. } | Event::Consistent => {}
            }
        }
        s.durable(s.last_seq());
        p.handle_input(&s.take_output()).unwrap();
    }
}

#[test]
fn initial_sync_skips_holes_and_deduplicates() {
    let size = 8 << 20;
    let mut p = Primary::new(size as u64, "v", Mode::Async);
    let mut vol = vec![0u8; size];
    // 1 MiB of incompressible data, then the same 1 MiB again at another offset.
    let mut r = Rng(99);
    for x in &mut vol[..1 << 20] {
        *x = r.next() as u8;
    }
    vol.copy_within(..1 << 20, 4 << 20);
    let mut sec = vec![0u8; size];
    let wire = sync_in_lockstep(&mut p, &vol, &mut sec);
    assert_eq!(sec, vol);
    // One copy of the random MiB travels (plus framing); the duplicate goes as COPYs.
    assert!(wire < (1 << 20) + (64 << 10), "{wire} bytes on the wire");
    assert_eq!(p.stats().copy_bytes, 1 << 20);
    assert_eq!(zero_hash(65536), block_hash(&[0u8; 65536]));

    // An incremental re-sync after a small change sends about the change.
    vol[5_000_000..5_010_000].fill(3);
    p.disconnect("again");
    let same0 = p.stats().blocks_same;
    let wire2 = sync_in_lockstep(&mut p, &vol, &mut sec);
    assert_eq!(sec, vol);
    // Only the four 4 KiB chunks the change touches travel (their 6.4 KB of random
    // remainder does not compress), not the 64 KiB block.
    assert!(wire2 < 4 * 4096 + 1024, "re-sync sent {wire2} bytes");
    assert_eq!(p.stats().blocks_same - same0, p.blocks() - 1);
}

#[test]
fn a_secondary_refuses_what_does_not_fit() {
    use tern_disk::wire::Msg;
    let mut s = Secondary::new(1 << 20);
    let hello = Msg::Hello {
        version: 1,
        size: 2 << 20,
        block_shift: 16,
        name: "x".into(),
        epoch: 0,
    };
    let (_, err) = s.handle_input(&hello.to_bytes());
    assert!(err.unwrap().contains("bytes"));
    let mut s = Secondary::new(1 << 20);
    let mut b = Msg::Hello {
        version: 1,
        size: 1 << 20,
        block_shift: 16,
        name: "x".into(),
        epoch: 0,
    }
    .to_bytes();
    let (ev, err) = s.handle_input(&b);
    assert!(err.is_none() && matches!(ev[0], Event::NeedHashes { .. }));
    s.ready(true);
    s.hashes(&[0; 16]);
    b.clear();
    Msg::Zero {
        seq: 1,
        offset: (1 << 20) - 10,
        len: 11,
    }
    .encode(&mut b);
    let (_, err) = s.handle_input(&b);
    assert!(err.unwrap().contains("beyond"));
    assert!(s.failed());
    // The primary hears the ERROR and ends its session.
    let mut p = Primary::new(1 << 20, "x", Mode::Sync);
    p.connect();
    let _ = p.take_output();
    assert!(p.handle_input(&s.take_output()).is_err());
    assert_eq!(p.phase(), Phase::Disconnected);
}

/// One disaster trial: a client sends requests; the protected VM writes each one into its
/// own 64-byte record on the volume and replies. With `gated`, the reply is a frame through
/// PipeCloud's gate (tagged with the write counter); without, it leaves at once (plain
/// async replication). Links cut now and then. At a random moment the primary site is lost:
/// only the secondary's durable state survives. Returns (replies the client saw, of those
/// the records missing at the backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protection {
    /// Async replication, replies leave at once.
    Async,
    /// Async replication, replies through the gate.
    Pipelined,
    /// Strict sync (the disk server's `Mode::Sync`): a write completes, and so its reply
    /// can leave, once the backup has committed it.
    Sync,
}

/// Bytes of one client record in the disaster trials.
const RECORD: usize = 64;

/// The content of client record `r` in trial `seed` (never all zero).
fn record_value(seed: u64, r: usize) -> Vec<u8> {
    (0..RECORD)
        .map(|i| (r as u64 * 31 + i as u64 * 7 + seed) as u8 | 1)
        .collect()
}

fn disaster_trial(seed: u64, protection: Protection) -> (usize, usize) {
    use tern_gate::{Gate, Outcome};
    let mode = if protection == Protection::Sync {
        Mode::Sync
    } else {
        Mode::Async
    };
    let mut w = World::new(seed, 2 << 20, mode, false);
    w.connect();
    let mut gate = Gate::new(1 << 20);
    // Sync: writes waiting for their commit (write counter, record).
    let mut waiting: Vec<(u64, usize)> = Vec::new();
    let mut seen: Vec<usize> = Vec::new();
    let mut next = 0usize;
    let disaster_at = 300 + w.rng.below(3000);
    let value = |r: usize| record_value(seed, r);
    for step in 0..disaster_at {
        match w.rng.below(10) {
            0 | 1 if next < w.size / RECORD => {
                let r = next;
                next += 1;
                let off = r * RECORD;
                w.pvol[off..off + RECORD].copy_from_slice(&value(r));
                w.p.write(off as u64, &w.pvol[off..off + RECORD]);
                let reply = (r as u32).to_le_bytes().to_vec();
                match protection {
                    Protection::Pipelined => {
                        if let Outcome::Release(f) = gate.outbound(step, w.p.writes(), reply) {
                            seen.push(u32::from_le_bytes(f[..4].try_into().unwrap()) as usize);
                        }
                    }
                    Protection::Sync => waiting.push((w.p.writes(), r)),
                    Protection::Async => seen.push(r),
                }
            }
            2..=4 => w.scan_step(),
            _ => w.deliver(),
        }
        gate.commit(w.p.committed_writes());
        while let Some(f) = gate.poll_release(step) {
            seen.push(u32::from_le_bytes(f[..4].try_into().unwrap()) as usize);
        }
        let committed = w.p.committed_writes();
        waiting.retain(|&(mine, r)| {
            if mine <= committed {
                seen.push(r);
            }
            mine > committed
        });
        w.maybe_cut();
    }
    // The primary site is gone; what the secondary made durable is all there is.
    let lost = seen
        .iter()
        .filter(|&&r| w.svol.durable[r * RECORD..(r + 1) * RECORD] != value(r)[..])
        .count();
    (seen.len(), lost)
}

#[test]
fn no_reply_a_client_saw_is_lost_with_the_gate_and_async_alone_loses_some() {
    let (mut gated_seen, mut sync_seen, mut async_lost_trials) = (0, 0, 0);
    for seed in 1..=120u64 {
        let (seen, lost) = disaster_trial(seed * 104_729, Protection::Pipelined);
        assert_eq!(
            lost, 0,
            "seed {seed}: {lost} of {seen} acknowledged requests lost"
        );
        gated_seen += seen;
        let (seen, lost) = disaster_trial(seed * 104_729, Protection::Sync);
        assert_eq!(
            lost, 0,
            "sync, seed {seed}: {lost} of {seen} acknowledged requests lost"
        );
        sync_seen += seen;
        let (_, lost) = disaster_trial(seed * 104_729, Protection::Async);
        async_lost_trials += usize::from(lost > 0);
    }
    eprintln!(
        "120 disasters: pipelined {gated_seen} replies seen, none lost; sync {sync_seen}, none \
         lost; async lost some in {async_lost_trials} trials"
    );
    assert!(
        sync_seen > 1000,
        "the sync trials acknowledged only {sync_seen}"
    );
    // The test can see a loss: plain async replication loses acknowledged requests.
    assert!(
        async_lost_trials > 10,
        "async lost in only {async_lost_trials} of 120 trials"
    );
    assert!(
        gated_seen > 1000,
        "the gated trials acknowledged only {gated_seen} requests"
    );
}

/// Two tiers in one disaster trial: a front end (no disk of its own) answers a client
/// request after `CALLS` commits at the database VM, whose volume is replicated
/// asynchronously. The database's replies to the front end are frames stamped with its
/// write clock (`tern_gate::Group`) and arrive in random order after random delays; the
/// front end's reply to the client leaves through its gate once the database's *backup*
/// has committed what the front end saw — learnt from a counter that lags (the peer's
/// counter page, read now and then). Without clocks the front end's gate has nothing to
/// wait for. Returns (requests the client saw answered, of those with a record missing at
/// the backup).
fn two_tier_trial(seed: u64, clocks: bool) -> (usize, usize) {
    use tern_gate::{Gate, Group, Outcome};
    const CALLS: usize = 3;
    let (fe_mac, db_mac, client_mac) = ([0xfe; 6], [0xdb; 6], [0xc1; 6]);
    let frame = |dst: [u8; 6], src: [u8; 6], id: usize| -> Vec<u8> {
        let mut f = [&dst[..], &src[..], &[0x08, 0x00]].concat();
        f.extend_from_slice(&(id as u32).to_le_bytes());
        f.resize(60, 0);
        f
    };
    let id_of = |f: &[u8]| u32::from_le_bytes(f[14..18].try_into().unwrap()) as usize;
    let mut w = World::new(seed, 2 << 20, Mode::Async, false);
    w.connect();
    let db = Group::new(db_mac, vec![fe_mac]);
    let mut fe = Group::new(fe_mac, vec![db_mac]);
    let mut fe_gate = Gate::new(1 << 20);
    // Database replies in flight to the front end: (due step, frame).
    let mut wire: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut acks = vec![0usize; w.size / RECORD / CALLS];
    let mut db_queue: Vec<usize> = Vec::new();
    let (mut next, mut seen, mut peer_committed) = (0usize, Vec::new(), 0u64);
    let value = |r: usize| record_value(seed, r);
    let disaster_at = 300 + w.rng.below(3000);
    for step in 0..disaster_at {
        match w.rng.below(12) {
            // A client request reaches the front end: its calls queue at the database.
            0 if next < acks.len() => {
                db_queue.extend((0..CALLS).map(|k| next * CALLS + k));
                next += 1;
            }
            // The database commits one call and replies, stamped with its clock.
            1 | 2 if !db_queue.is_empty() => {
                let r = db_queue.remove(0);
                let off = r * RECORD;
                w.pvol[off..off + RECORD].copy_from_slice(&value(r));
                w.p.write(off as u64, &w.pvol[off..off + RECORD]);
                let mut f = frame(fe_mac, db_mac, r);
                db.stamp(&mut f, w.p.writes());
                wire.push((step + w.rng.below(40), f));
            }
            3..=5 => w.scan_step(),
            _ => w.deliver(),
        }
        // Replies due reach the front end in any order; its clock takes them in.
        let mut i = 0;
        while i < wire.len() {
            if wire[i].0 <= step && w.rng.chance(500) {
                let (_, mut f) = wire.swap_remove(i);
                assert!(
                    fe.receive(&mut f, true),
                    "a stamped frame from the database"
                );
                assert_eq!(f.len(), 60, "the trailer is gone before the guest sees it");
                let req = id_of(&f) / CALLS;
                acks[req] += 1;
                if acks[req] == CALLS {
                    let tag = if clocks { fe.clock(0) } else { vec![0] };
                    let reply = frame(client_mac, fe_mac, req);
                    if let Outcome::Release(f) = fe_gate.outbound_clock(step, tag, reply) {
                        seen.push(id_of(&f));
                    }
                }
            } else {
                i += 1;
            }
        }
        // The database's counter page, read now and then (it lags the truth).
        if w.rng.chance(300) {
            peer_committed = w.p.committed_writes();
        }
        fe_gate.commit(0);
        fe_gate.commit_member(1, peer_committed);
        while let Some(f) = fe_gate.poll_release(step) {
            seen.push(id_of(&f));
        }
        w.maybe_cut();
    }
    let lost = seen
        .iter()
        .filter(|&&req| {
            (req * CALLS..(req + 1) * CALLS)
                .any(|r| w.svol.durable[r * RECORD..(r + 1) * RECORD] != value(r)[..])
        })
        .count();
    (seen.len(), lost)
}

#[test]
fn two_tiers_lose_no_reply_with_clocks_and_do_without() {
    let (mut seen_total, mut unclocked_lost_trials) = (0, 0);
    for seed in 1..=120u64 {
        let (seen, lost) = two_tier_trial(seed * 7919, true);
        assert_eq!(
            lost, 0,
            "seed {seed}: {lost} of {seen} acknowledged requests lost"
        );
        seen_total += seen;
        let (_, lost) = two_tier_trial(seed * 7919, false);
        unclocked_lost_trials += usize::from(lost > 0);
    }
    eprintln!(
        "120 two-tier disasters: {seen_total} replies seen with clocks, none lost; without \
         clocks some lost in {unclocked_lost_trials} trials"
    );
    assert!(
        unclocked_lost_trials > 10,
        "without clocks only {unclocked_lost_trials} of 120 trials lost a reply"
    );
    assert!(seen_total > 500, "only {seen_total} replies seen");
}

/// Failover with a partitioned but still-running primary: the backup is promoted (its
/// epoch goes to 1, persisted), the old primary keeps taking guest writes, and when the
/// partition heals it reconnects to the backup. The backup refuses it (fenced), so none of
/// its later writes is ever committed: its gate, which releases a reply only once the
/// writes before it are committed, never lets one out. Clients hear only the new primary.
#[test]
fn a_promoted_backup_fences_the_old_primary_so_it_commits_nothing_more() {
    for seed in 1..=6u64 {
        let (mut w, _) = run(seed * 104_729, Mode::Async, false, false);
        let committed = w.p.committed_writes();
        assert_eq!(
            committed,
            w.p.writes(),
            "seed {seed}: in step before the disaster"
        );
        w.cut(false);
        let backup = w.svol.durable.clone();
        // Failover: the backup is promoted to epoch 1. The old primary does not know.
        let promoted = 1;
        for _ in 0..40 {
            w.guest_write();
        }
        // The partition heals: the old primary (epoch 0) reaches the backup again.
        w.to_s.clear();
        w.to_p.clear();
        w.s = Secondary::new(w.size as u64).with_epoch(promoted);
        w.p.connect();
        for _ in 0..5 {
            w.scan_step();
        }
        let (events, err) = w.s.handle_input(&w.p.take_output());
        assert!(
            events.is_empty(),
            "seed {seed}: nothing from a stale primary is applied"
        );
        assert!(err.unwrap().contains("fenced"), "seed {seed}");
        assert!(w.p.handle_input(&w.s.take_output()).is_err());
        assert_eq!(w.p.phase(), Phase::Disconnected);
        assert_eq!(
            w.p.committed_writes(),
            committed,
            "seed {seed}: a write after the failover counted as committed (its reply would \
             leave the old primary's gate)"
        );
        assert!(w.p.writes() > committed);
        assert!(w.svol.durable == backup, "seed {seed}: the backup changed");
        // The promoted copy's own primary (epoch 1) replicates on to a new secondary.
        let mut np = Primary::new(w.size as u64, "sim", Mode::Async).with_epoch(promoted);
        np.connect();
        let mut s2 = Secondary::new(w.size as u64).with_epoch(promoted);
        let (events, err) = s2.handle_input(&np.take_output());
        assert!(err.is_none(), "seed {seed}: {err:?}");
        assert!(matches!(events[..], [Event::NeedHashes { epoch: 1, .. }]));
    }
}
