//! The backup's write log (PipeCloud's backup server), sans-IO: record format and the
//! backlog that decides which logged write may be applied next.
//!
//! A consistent secondary does not write replicated changes into its volume directly: it
//! appends them to its log, makes the log durable and acknowledges (so the primary's
//! committed counter and the gate move as soon as the bytes are safe), and an applier moves
//! them from the log into the volume in order, each only once every write it depends on
//! at the *other* disks of its protected group is applied there too (the CLOCK a group's
//! primary sends before each write; peers' applied counters come from their backups'
//! counter pages). The volumes at the backup site are therefore always a causally
//! consistent cut of the group, and so is what survives a crash of the backup: the log is
//! replayed on restart. A failover applies what it can and drops the rest (writes that
//! depend on a peer's write that never reached its backup: no client saw their effects,
//! the gate held every frame that depended on them).
//!
//! ```text
//! file    = header | record*                        (a torn tail is cut, see below)
//! header  = "TERNWAL2" | applied write (8) | reserved (8)           HEADER bytes
//! record  = body length (4) | BLAKE3 of body, first 8 bytes | body
//! body    = seq (8) | write (8) | at (8) | durable (8)
//!           | count (1) | count x (MAC (6) | writes (8))
//!           | kind (1) | offset (8) | kind 1 WRITE: data | 2 ZERO: length (8)
//!           | 3 COPY: source (8) | length (4)
//! ```
//! All integers little-endian. `write` is the number of the guest write (at its primary) the
//! record carries, 0 when its primary sends no clocks. The log only ever holds records of
//! one replication session: a new session starts by applying and emptying it.
//!
//! `at` is the file offset the record starts at and `durable` the log's length that was
//! fdatasynced when it was appended. Records appended between two fdatasyncs are not
//! acknowledged and may reach the disk in any order, so after a crash a bad record can be
//! followed by valid ones of the same batch: that is a torn tail (cut). A bad record that
//! a later valid record says was already durable (its `durable` is past the bad record's
//! start) held an acknowledged write: that is corruption, and [`decode`] fails (nothing is
//! cut; the backup does not start until someone looks).

use std::collections::VecDeque;

use crate::secondary::Op;
use crate::wire::MAX_CLOCK_PEERS;

pub const MAGIC: &[u8; 8] = b"TERNWAL2";
pub const HEADER: usize = 24;
/// Largest record body: a DATA's payload plus the fields.
pub const MAX_RECORD: usize = crate::wire::MAX_DATA + 64 + MAX_CLOCK_PEERS * 14;

pub type Mac = [u8; 6];

/// Most bytes of logged writes the backlog holds in memory (records wait there for the
/// group's other backups). At the bound the replication session stops reading (the
/// primary's stream backs up, its sync writes wait and then degrade) until the applier
/// makes room: a missing or stuck peer backup costs no more memory than this.
pub const MAX_BACKLOG_BYTES: u64 = 256 << 20;
/// Most records the backlog holds (zeroes count no bytes), likewise.
pub const MAX_BACKLOG_RECORDS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The replication message's sequence number (this session).
    pub seq: u64,
    /// The guest write it carries (0: unknown).
    pub write: u64,
    /// Peer tiers' writes it depends on.
    pub deps: Vec<(Mac, u64)>,
    pub op: Op,
}

impl Record {
    /// Bytes of the volume it changes (what the backlog's size counts).
    pub fn bytes(&self) -> u64 {
        match &self.op {
            Op::Write { data, .. } => data.len() as u64,
            Op::Zero { .. } => 0,
            Op::Copy { len, .. } => u64::from(*len),
        }
    }
}

pub fn header(applied_write: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&applied_write.to_le_bytes());
    h
}

fn digest(body: &[u8]) -> [u8; 8] {
    blake3::hash(body).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

/// Appends `r`, framed, to `out`; the record starts at file offset `at`, and the log is
/// durable up to `durable` (≤ `at`) when it is appended.
pub fn encode(r: &Record, at: u64, durable: u64, out: &mut Vec<u8>) {
    debug_assert!(durable <= at);
    let start = out.len();
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.write.to_le_bytes());
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&durable.to_le_bytes());
    let deps = &r.deps[..r.deps.len().min(MAX_CLOCK_PEERS)];
    out.push(deps.len() as u8);
    for (mac, n) in deps {
        out.extend_from_slice(mac);
        out.extend_from_slice(&n.to_le_bytes());
    }
    match &r.op {
        Op::Write { offset, data } => {
            out.push(1);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(data);
        }
        Op::Zero { offset, len } => {
            out.push(2);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        Op::Copy { offset, src, len } => {
            out.push(3);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&src.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
    let body = out.len() - start - 12;
    let d = digest(&out[start + 12..]);
    out[start..start + 4].copy_from_slice(&(body as u32).to_le_bytes());
    out[start + 4..start + 12].copy_from_slice(&d);
}

struct Cur<'a>(&'a [u8]);

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// A record's body: the record, its `at` and its `durable`.
fn decode_body(body: &[u8]) -> Option<(Record, u64, u64)> {
    let mut c = Cur(body);
    let seq = c.u64()?;
    let write = c.u64()?;
    let at = c.u64()?;
    let durable = c.u64()?;
    let n = c.take(1)?[0] as usize;
    if n > MAX_CLOCK_PEERS {
        return None;
    }
    let mut deps = Vec::with_capacity(n);
    for _ in 0..n {
        let mac: Mac = c.take(6)?.try_into().ok()?;
        deps.push((mac, c.u64()?));
    }
    let kind = c.take(1)?[0];
    let offset = c.u64()?;
    let op = match kind {
        1 if !c.0.is_empty() => Op::Write {
            offset,
            data: std::mem::take(&mut c.0).to_vec(),
        },
        2 => Op::Zero {
            offset,
            len: c.u64()?,
        },
        3 => Op::Copy {
            offset,
            src: c.u64()?,
            len: u32::from_le_bytes(c.take(4)?.try_into().ok()?),
        },
        _ => return None,
    };
    c.0.is_empty().then_some((
        Record {
            seq,
            write,
            deps,
            op,
        },
        at,
        durable,
    ))
}

/// The intact record starting at `at`, if there is one there: (record, its `durable`,
/// its framed length). An intact record names its own offset, so one copied into another
/// record's data (a guest that writes a log image) is not taken for a record.
fn record_at(bytes: &[u8], at: usize) -> Option<(Record, u64, usize)> {
    let head = bytes.get(at..at.checked_add(12)?)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(at + 12..at + 12 + len)?;
    // Cheap test first (the scan past a bad record tries every offset): its own offset.
    if body.get(16..24)? != (at as u64).to_le_bytes() || digest(body) != head[4..12] {
        return None;
    }
    let (r, own, durable) = decode_body(body)?;
    (own == at as u64 && durable <= own).then_some((r, durable, 12 + len))
}

/// What a log file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// The guest write the volume held when the log was last emptied.
    pub applied_write: u64,
    pub records: Vec<Record>,
    /// Bytes of intact log (header and whole records); anything after is a torn write.
    pub valid: usize,
}

/// Reads a log file's bytes: an empty file is an empty log. The first record that is cut
/// short or does not match its checksum ends the log if it was never acknowledged (no
/// valid record after it says the log was durable past its start: a torn tail); otherwise
/// the log is corrupt and this fails, naming the offset.
pub fn decode(bytes: &[u8]) -> Result<Contents, String> {
    if bytes.is_empty() {
        return Ok(Contents {
            applied_write: 0,
            records: Vec::new(),
            valid: 0,
        });
    }
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not a tern write log (bad header)".into());
    }
    let applied_write = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    let mut at = HEADER;
    while let Some((r, _, len)) = record_at(bytes, at) {
        records.push(r);
        at += len;
    }
    // Anything valid after the first bad record that was appended once the bad one was
    // durable means an acknowledged record is unreadable.
    for p in at + 1..bytes.len().saturating_sub(11) {
        if let Some((_, durable, _)) = record_at(bytes, p) {
            if durable > at as u64 {
                return Err(format!(
                    "corrupt record at offset {at}: the record at offset {p} says the log was \
                     durable to {durable}, so it held acknowledged writes ({} intact records \
                     before it; the log is left as it is)",
                    records.len()
                ));
            }
        }
    }
    Ok(Contents {
        applied_write,
        records,
        valid: at,
    })
}

/// Logged records not yet applied, in order, and what decides when the next may go.
#[derive(Debug, Default)]
pub struct Backlog {
    queue: VecDeque<Record>,
    bytes: u64,
    /// The highest guest write applied to the volume (published to peers' backups).
    applied_write: u64,
    /// Records dropped by [`Backlog::discard`] (failover) since this backlog began.
    pub discarded: u64,
}

impl Backlog {
    pub fn new(applied_write: u64) -> Backlog {
        Backlog {
            applied_write,
            ..Backlog::default()
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// At [`MAX_BACKLOG_BYTES`] or [`MAX_BACKLOG_RECORDS`]: take no more until it drains.
    pub fn is_full(&self) -> bool {
        self.bytes >= MAX_BACKLOG_BYTES || self.queue.len() >= MAX_BACKLOG_RECORDS
    }

    pub fn applied_write(&self) -> u64 {
        self.applied_write
    }

    /// The volume holds everything up to guest write `w` (a completed sync).
    pub fn set_applied_write(&mut self, w: u64) {
        self.applied_write = w;
    }

    /// The records still to apply, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.queue.iter()
    }

    pub fn push(&mut self, r: Record) {
        self.bytes += r.bytes();
        self.queue.push_back(r);
    }

    /// The first record's dependency that is not met yet, given each peer's applied
    /// write (`None`: a peer this backup does not track, taken as met).
    pub fn blocked_on(&self, peer_applied: impl Fn(&Mac) -> Option<u64>) -> Option<(Mac, u64)> {
        let r = self.queue.front()?;
        r.deps
            .iter()
            .find(|(mac, n)| peer_applied(mac).is_some_and(|have| have < *n))
            .copied()
    }

    /// The next record, if every write it depends on is applied at its peer's backup,
    /// left in the backlog: the caller applies it, then [`Backlog::pop`]s it.
    pub fn peek_ready(&self, peer_applied: impl Fn(&Mac) -> Option<u64>) -> Option<&Record> {
        if self.blocked_on(peer_applied).is_some() {
            return None;
        }
        self.queue.front()
    }

    /// The next record, if every write it depends on is applied at its peer's backup.
    /// The caller applies it to the volume.
    pub fn pop_ready(&mut self, peer_applied: impl Fn(&Mac) -> Option<u64>) -> Option<Record> {
        if self.queue.is_empty() || self.blocked_on(peer_applied).is_some() {
            return None;
        }
        self.pop()
    }

    /// The next record regardless of its dependencies (a new session replaces the copy's
    /// contents anyway).
    pub fn pop(&mut self) -> Option<Record> {
        let r = self.queue.pop_front()?;
        self.bytes -= r.bytes();
        self.applied_write = self.applied_write.max(r.write);
        Some(r)
    }

    /// Failover: drops what is still waiting; returns how many records.
    pub fn discard(&mut self) -> u64 {
        let n = self.queue.len() as u64;
        self.queue.clear();
        self.bytes = 0;
        self.discarded += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: Mac = [2, 0, 0, 0, 0, 1];
    const Y: Mac = [2, 0, 0, 0, 0, 2];

    fn rec(seq: u64, write: u64, deps: Vec<(Mac, u64)>) -> Record {
        Record {
            seq,
            write,
            deps,
            op: Op::Write {
                offset: seq * 4096,
                data: vec![seq as u8; 512],
            },
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let rs = vec![
            rec(1, 1, vec![(X, 5), (Y, 0)]),
            Record {
                seq: 2,
                write: 2,
                deps: vec![],
                op: Op::Zero {
                    offset: 0,
                    len: 1 << 20,
                },
            },
            Record {
                seq: 3,
                write: 2,
                deps: vec![(Y, 9)],
                op: Op::Copy {
                    offset: 8192,
                    src: 0,
                    len: 4096,
                },
            },
        ];
        // Each record made durable before the next is appended.
        let f = log(&rs, true);
        let c = decode(&f).unwrap();
        assert_eq!((c.applied_write, c.valid), (7, f.len()));
        assert_eq!(c.records, rs);
        // Cut anywhere inside the last record: the first two survive.
        let two = log(&rs[..2], true).len();
        for cut in two..f.len() {
            let c = decode(&f[..cut]).unwrap();
            assert_eq!(c.records, rs[..2], "cut at {cut}");
            assert_eq!(c.valid, two);
        }
        // A flipped bit in the last body ends the log there (it was never acknowledged).
        let mut bad = f.clone();
        bad[two + 20] ^= 1;
        let c = decode(&bad).unwrap();
        assert_eq!((c.records.len(), c.valid), (2, two));
        assert!(decode(b"TERNWAL1........................").is_err());
        assert_eq!(decode(b"").unwrap().records, vec![]);
    }

    /// Frames `rs` as the log appends them: with `sync_each`, the log is made durable after
    /// every append (each later record says so); without, they are one unsynced batch.
    fn log(rs: &[Record], sync_each: bool) -> Vec<u8> {
        let mut f = header(7).to_vec();
        let mut durable = f.len() as u64;
        for r in rs {
            let at = f.len() as u64;
            encode(r, at, durable, &mut f);
            if sync_each {
                durable = f.len() as u64;
            }
        }
        f
    }

    #[test]
    fn a_bad_record_before_durable_ones_is_corruption_not_a_torn_tail() {
        let rs: Vec<Record> = (1..=5).map(|i| rec(i, i, vec![])).collect();
        let f = log(&rs, true);
        let second = log(&rs[..1], true).len();
        // A flipped bit in the middle: records after it were appended once it was durable.
        let mut bad = f.clone();
        bad[second + 40] ^= 0x10;
        let e = decode(&bad).unwrap_err();
        assert!(
            e.contains(&format!("corrupt record at offset {second}")),
            "{e}"
        );
        // So is a bad length field.
        let mut bad = f.clone();
        bad[second + 2] ^= 0x80;
        assert!(decode(&bad).is_err());
        // One unsynced batch may reach the disk in any order: a bad record followed by
        // valid ones of the same batch is a torn tail, cut at the bad one.
        let batch = {
            let mut f = log(&rs[..1], true);
            let durable = f.len() as u64;
            for r in &rs[1..] {
                let at = f.len() as u64;
                encode(r, at, durable, &mut f);
            }
            f
        };
        let mut torn = batch.clone();
        torn[second + 40] ^= 0x10;
        let c = decode(&torn).unwrap();
        assert_eq!((c.records.len(), c.valid), (1, second));
        // A record image inside a record's data (a guest writing a log file) is no record.
        let mut inner = Vec::new();
        encode(&rs[4], 1 << 40, 1 << 40, &mut inner);
        let nested = vec![
            rec(9, 9, vec![]),
            Record {
                seq: 10,
                write: 10,
                deps: vec![],
                op: Op::Write {
                    offset: 0,
                    data: inner,
                },
            },
        ];
        let mut f = log(&nested, true);
        let first = log(&nested[..1], true).len();
        f[first + 40] ^= 1;
        assert_eq!(decode(&f).unwrap().records.len(), 1);
    }

    #[test]
    fn a_write_waits_for_what_it_depends_on_at_the_other_disks() {
        let mut b = Backlog::new(0);
        b.push(rec(1, 1, vec![]));
        b.push(rec(2, 2, vec![(X, 3)]));
        b.push(rec(3, 3, vec![(X, 1)]));
        let x_at = std::cell::Cell::new(0);
        let peers = |m: &Mac| (*m == X).then(|| x_at.get());
        assert_eq!(b.pop_ready(peers).unwrap().seq, 1);
        assert_eq!(b.applied_write(), 1);
        // Record 2 needs X's write 3; record 3 behind it waits too (in order).
        assert_eq!(b.blocked_on(peers), Some((X, 3)));
        assert!(b.pop_ready(peers).is_none());
        x_at.set(3);
        assert_eq!(b.pop_ready(peers).unwrap().seq, 2);
        assert_eq!(b.pop_ready(peers).unwrap().seq, 3);
        assert!(b.is_empty() && b.bytes() == 0);
        assert_eq!(b.applied_write(), 3);
        // A peer this backup does not track does not hold anything.
        b.push(rec(4, 4, vec![(Y, 100)]));
        assert_eq!(b.pop_ready(peers).unwrap().seq, 4);
        // Failover drops what still waits.
        b.push(rec(5, 5, vec![(X, 9)]));
        b.push(rec(6, 6, vec![]));
        assert!(b.pop_ready(peers).is_none());
        assert_eq!(b.discard(), 2);
        assert_eq!((b.len(), b.discarded, b.applied_write()), (0, 2, 4));
    }

    #[test]
    fn the_backlog_is_full_at_its_bounds() {
        let mut b = Backlog::new(0);
        let big = |seq| Record {
            seq,
            write: seq,
            deps: vec![(X, u64::MAX)],
            op: Op::Write {
                offset: 0,
                data: vec![1; crate::wire::MAX_DATA],
            },
        };
        let per = crate::wire::MAX_DATA as u64;
        for seq in 1..MAX_BACKLOG_BYTES / per {
            b.push(big(seq));
            assert!(!b.is_full());
        }
        b.push(big(0));
        assert!(b.is_full());
        b.pop();
        assert!(!b.is_full());
        let mut b = Backlog::new(0);
        for seq in 0..MAX_BACKLOG_RECORDS as u64 {
            assert!(!b.is_full());
            b.push(Record {
                seq,
                write: seq,
                deps: vec![],
                op: Op::Zero {
                    offset: 0,
                    len: 4096,
                },
            });
        }
        assert!(b.is_full() && b.bytes() == 0);
    }
}
