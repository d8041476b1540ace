//! The secondary's side of replication, sans-IO.
//!
//! ```text
//!  AwaitHello --HELLO ok--> (driver: mark inconsistent, hash the volume) --hashes()--> Applying
//!      |                                                                                  |
//!      +--------------- any bad input: ERROR sent, session over --------------------------+
//! ```
//! Messages become [`Op`]s applied in order by the driver. The driver makes what it applied
//! durable (fdatasync) whenever its input runs dry, at a FLUSH, or after
//! [`ACK_EVERY_BYTES`], then calls [`Secondary::durable`] with the sequence number applied
//! so far, which emits the ACK (never beyond what was applied: the deterministic simulation
//! caught an ACK that covered events decoded in the same batch but not yet applied). A SYNCED
//! that is durable makes the copy consistent ([`Event::Consistent`], persisted by the
//! driver). Every offset and length is checked against the volume before it becomes an
//! [`Op`].

use crate::wire::{self, ChunkHash, Compression, Msg};

/// Applied bytes after which the driver should make them durable and acknowledge.
pub const ACK_EVERY_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Copy { offset: u64, src: u64, len: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A valid HELLO: persist "inconsistent" and `epoch` (the primary's, never lower than
    /// this copy's), then call [`Secondary::hashes`] with the volume's block hashes
    /// ([`crate::volume::block_hashes`]).
    NeedHashes { name: String, epoch: u64 },
    /// Apply `op`, the replication stream's message `seq` (in order).
    Apply { seq: u64, op: Op },
    /// The applies up to the next Clock carry the guest's writes up to number `write`,
    /// which depend on these peer tiers' writes (CLOCK, from a protected group's primary).
    Clock {
        write: u64,
        deps: Vec<([u8; 6], u64)>,
    },
    /// Which of the block at `offset`'s chunks differ from `hashes`? Read the block (after
    /// every Apply before this event) and call [`Secondary::check_answer`].
    Check { offset: u64, hashes: Vec<ChunkHash> },
    /// Make everything applied so far durable now and call [`Secondary::durable`] with
    /// `seq`: the events after this one are not applied yet, so the ACK must not cover them.
    SyncNow { seq: u64 },
    /// The copy is consistent up to a completed sync: persist it.
    Consistent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Hashing,
    Applying,
    Failed,
}

#[derive(Debug)]
pub struct Secondary {
    size: u64,
    block_shift: u8,
    phase: Phase,
    reader: wire::Reader,
    out: Vec<u8>,
    /// Last sequence number applied (handed out as an Op).
    applied: u64,
    durable: u64,
    synced_at: Option<u64>,
    since_ack: u64,
    /// The session's zstd stream (DATA compression 2).
    stream: Option<BoundedStream>,
    pub bytes_in: u64,
    /// This copy's fencing epoch: bumped (and persisted) by each promotion; a HELLO with a
    /// lower one comes from a primary that was failed over from, and is refused.
    epoch: u64,
}

impl Secondary {
    pub fn new(size: u64) -> Secondary {
        Secondary {
            size,
            block_shift: crate::BLOCK_SHIFT,
            phase: Phase::AwaitHello,
            reader: wire::Reader::default(),
            out: Vec::new(),
            applied: 0,
            durable: 0,
            synced_at: None,
            since_ack: 0,
            stream: None,
            bytes_in: 0,
            epoch: 0,
        }
    }

    /// This copy's persisted fencing epoch.
    pub fn with_epoch(mut self, epoch: u64) -> Secondary {
        self.epoch = epoch;
        self
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Applied but not yet durable.
    pub fn dirty(&self) -> bool {
        self.applied > self.durable
    }

    /// The last sequence number decoded: once every event so far is applied and durable,
    /// `durable(last_seq())` acknowledges all of it.
    pub fn last_seq(&self) -> u64 {
        self.applied
    }

    /// Decodes what arrived; returns the events in order. After an error the session is over
    /// (an ERROR frame is queued for the primary) and the events before it still apply.
    pub fn handle_input(&mut self, bytes: &[u8]) -> (Vec<Event>, Option<String>) {
        let mut ev = Vec::new();
        if self.phase == Phase::Failed {
            return (ev, Some("session already failed".into()));
        }
        self.bytes_in += bytes.len() as u64;
        self.reader.push(bytes);
        loop {
            let m = match self.reader.next_msg() {
                Ok(Some(m)) => m,
                Ok(None) => return (ev, None),
                Err(e) => return (ev, Some(self.fail(format!("bad frame: {e}")))),
            };
            if let Err(e) = self.on_msg(m, &mut ev) {
                return (ev, Some(self.fail(e)));
            }
        }
    }

    fn fail(&mut self, msg: String) -> String {
        self.phase = Phase::Failed;
        Msg::Error(msg.clone()).encode(&mut self.out);
        msg
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(format!(
                "{what} at {offset}+{len} is beyond the volume's {} bytes",
                self.size
            )),
        }
    }

    fn sequenced(&mut self, seq: u64) -> Result<(), String> {
        if seq <= self.applied {
            return Err(format!("sequence {seq} after {}", self.applied));
        }
        self.applied = seq;
        Ok(())
    }

    fn on_msg(&mut self, m: Msg, ev: &mut Vec<Event>) -> Result<(), String> {
        match (self.phase, m) {
            (
                Phase::AwaitHello,
                Msg::Hello {
                    version,
                    size,
                    block_shift,
                    name,
                    epoch,
                },
            ) => {
                if epoch < self.epoch {
                    return Err(format!(
                        "fenced: primary {name:?} has epoch {epoch}, this copy was promoted \
                         to epoch {} (a failover happened; this primary is stale)",
                        self.epoch
                    ));
                }
                if version != wire::VERSION {
                    return Err(format!(
                        "replication version {version} (this secondary speaks {})",
                        wire::VERSION
                    ));
                }
                if size != self.size || block_shift != self.block_shift {
                    return Err(format!(
                        "volume {name:?} is {size} bytes (block shift {block_shift}); this \
                         secondary's volume is {} bytes (block shift {})",
                        self.size, self.block_shift
                    ));
                }
                self.phase = Phase::Hashing;
                self.epoch = epoch;
                ev.push(Event::NeedHashes { name, epoch });
            }
            (Phase::Applying, m) => match m {
                Msg::Data {
                    seq,
                    offset,
                    raw_len,
                    compression,
                    bytes,
                } => {
                    self.check_range("DATA", offset, u64::from(raw_len))?;
                    self.sequenced(seq)?;
                    // Every decompression is bounded by the length the DATA says
                    // (≤ MAX_DATA): a frame that expands beyond it is a protocol error.
                    let data = match compression {
                        Compression::None => bytes,
                        Compression::Frame => zstd::bulk::decompress(&bytes, raw_len as usize)
                            .map_err(|e| format!("DATA {seq}: zstd: {e}"))?,
                        Compression::Stream => {
                            if self.stream.is_none() {
                                self.stream =
                                    Some(BoundedStream::new().map_err(|e| format!("zstd: {e}"))?);
                            }
                            let z = self.stream.as_mut().expect("just set");
                            z.decompress(&bytes, raw_len as usize)
                                .map_err(|e| format!("DATA {seq}: zstd stream: {e}"))?
                        }
                    };
                    if data.len() != raw_len as usize {
                        return Err(format!("DATA {seq}: {} bytes, said {raw_len}", data.len()));
                    }
                    self.since_ack += u64::from(raw_len);
                    ev.push(Event::Apply {
                        seq,
                        op: Op::Write { offset, data },
                    });
                }
                Msg::Zero { seq, offset, len } => {
                    self.check_range("ZERO", offset, len)?;
                    self.sequenced(seq)?;
                    ev.push(Event::Apply {
                        seq,
                        op: Op::Zero { offset, len },
                    });
                }
                Msg::Copy {
                    seq,
                    offset,
                    src,
                    len,
                } => {
                    self.check_range("COPY", offset, u64::from(len))?;
                    self.check_range("COPY source", src, u64::from(len))?;
                    self.sequenced(seq)?;
                    self.since_ack += u64::from(len);
                    ev.push(Event::Apply {
                        seq,
                        op: Op::Copy { offset, src, len },
                    });
                }
                Msg::Flush { seq } => {
                    self.sequenced(seq)?;
                    ev.push(Event::SyncNow { seq });
                }
                Msg::Synced { seq } => {
                    self.sequenced(seq)?;
                    self.synced_at = Some(seq);
                    ev.push(Event::SyncNow { seq });
                }
                Msg::Check { offset, hashes } => {
                    let block = 1u64 << self.block_shift;
                    let len = self.size.saturating_sub(offset).min(block);
                    if offset % block != 0
                        || offset >= self.size
                        || hashes.len() as u64 != len.div_ceil(crate::CHUNK as u64)
                    {
                        return Err(format!("CHECK of {} chunks at {offset}", hashes.len()));
                    }
                    ev.push(Event::Check { offset, hashes });
                }
                Msg::Clock { write, deps } => ev.push(Event::Clock { write, deps }),
                other => return Err(format!("unexpected {} from the primary", kind(&other))),
            },
            (_, other) => {
                return Err(format!(
                    "unexpected {} from the primary before the handshake finished",
                    kind(&other)
                ));
            }
        }
        if self.since_ack >= ACK_EVERY_BYTES && !matches!(ev.last(), Some(Event::SyncNow { .. })) {
            self.since_ack = 0;
            ev.push(Event::SyncNow { seq: self.applied });
        }
        Ok(())
    }

    /// The answer to [`Event::Check`]: this volume's chunk hashes of that block.
    pub fn check_answer(&mut self, offset: u64, theirs: &[ChunkHash], mine: &[ChunkHash]) {
        let mut bitmap = 0u16;
        for (i, t) in theirs.iter().enumerate() {
            if mine.get(i) != Some(t) {
                bitmap |= 1 << i;
            }
        }
        Msg::Need { offset, bitmap }.encode(&mut self.out);
    }

    /// The volume's block hashes (after [`Event::NeedHashes`]).
    pub fn hashes(&mut self, hashes: &[ChunkHash]) {
        if self.phase != Phase::Hashing {
            return;
        }
        for (i, c) in hashes.chunks(wire::MAX_HASHES).enumerate() {
            Msg::Hashes {
                first: (i * wire::MAX_HASHES) as u64,
                hashes: c.to_vec(),
            }
            .encode(&mut self.out);
        }
        Msg::HashesEnd {
            blocks: hashes.len() as u64,
        }
        .encode(&mut self.out);
        self.phase = Phase::Applying;
    }

    /// The READY that answers a HELLO (sent by the driver before hashing, so the primary
    /// knows the sizes matched).
    pub fn ready(&mut self, consistent: bool) {
        Msg::Ready {
            size: self.size,
            block_shift: self.block_shift,
            consistent,
        }
        .encode(&mut self.out);
    }

    /// Everything up to `seq` (from [`Event::SyncNow`]) is applied and durable: acknowledge
    /// it. Returns [`Event::Consistent`] when this completes a sync.
    pub fn durable(&mut self, seq: u64) -> Option<Event> {
        let upto = seq.min(self.applied);
        if upto <= self.durable {
            return None;
        }
        self.durable = upto;
        Msg::Ack { seq: self.durable }.encode(&mut self.out);
        match self.synced_at {
            Some(s) if s <= self.durable => {
                self.synced_at = None;
                Some(Event::Consistent)
            }
            _ => None,
        }
    }
}

/// Window of the primary's replication stream (`tern_codec::residual`'s, 8 MiB): a
/// stream asking for a larger window is refused rather than given the memory.
pub const STREAM_WINDOW_LOG: u32 = 23;

/// The session's zstd stream (DATA compression 2), decompressed one DATA at a time with
/// the output capped at the DATA's raw length: a bomb costs at most `raw_len` bytes and
/// one step of zstd, then is a protocol error.
struct BoundedStream {
    z: zstd::stream::raw::Decoder<'static>,
}

impl std::fmt::Debug for BoundedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundedStream")
    }
}

impl BoundedStream {
    fn new() -> std::io::Result<BoundedStream> {
        let mut z = zstd::stream::raw::Decoder::new()?;
        z.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
            STREAM_WINDOW_LOG,
        ))?;
        Ok(BoundedStream { z })
    }

    /// What `input` (a whole flushed piece of the stream) decompresses to, which must be
    /// exactly `len` bytes.
    fn decompress(&mut self, input: &[u8], len: usize) -> Result<Vec<u8>, String> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = vec![0u8; len];
        let mut inb = InBuffer::around(input);
        let mut done = 0;
        while done < len {
            let mut ob = OutBuffer::around(&mut out[done..]);
            let was = inb.pos();
            self.z.run(&mut inb, &mut ob).map_err(|e| e.to_string())?;
            let made = ob.pos();
            done += made;
            if made == 0 && inb.pos() == was {
                // No progress with room left: the input ends short of `len`.
                return Err(format!("{done} bytes, said {len}"));
            }
        }
        // `len` bytes are out: anything more (input left, or output still buffered in the
        // decoder) means the piece expands beyond what it said.
        let mut spare = [0u8; 1];
        let mut ob = OutBuffer::around(&mut spare[..]);
        self.z.run(&mut inb, &mut ob).map_err(|e| e.to_string())?;
        if ob.pos() > 0 || inb.pos() < input.len() {
            return Err(format!("expands beyond the {len} bytes it said"));
        }
        Ok(out)
    }
}

fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "HELLO",
        Msg::Data { .. } => "DATA",
        Msg::Zero { .. } => "ZERO",
        Msg::Copy { .. } => "COPY",
        Msg::Flush { .. } => "FLUSH",
        Msg::Synced { .. } => "SYNCED",
        Msg::Ready { .. } => "READY",
        Msg::Hashes { .. } => "HASHES",
        Msg::Check { .. } => "CHECK",
        Msg::Clock { .. } => "CLOCK",
        Msg::Need { .. } => "NEED",
        Msg::HashesEnd { .. } => "HASHES_END",
        Msg::Ack { .. } => "ACK",
        Msg::Error(_) => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd frame of RLE blocks that expands to `total` zero bytes from a few KiB.
    fn zero_bomb(total: u64) -> Vec<u8> {
        let block: u64 = 128 << 10;
        // Magic, frame header (no content size, no checksum), a 128 KiB window.
        let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];
        let n = total / block;
        for i in 0..n {
            let header = u32::from(i == n - 1) | (1 << 1) | ((block as u32) << 3);
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.push(0);
        }
        f
    }

    fn applying() -> Secondary {
        let mut s = Secondary::new(1 << 30);
        let hello = Msg::Hello {
            version: wire::VERSION,
            size: 1 << 30,
            block_shift: crate::BLOCK_SHIFT,
            name: "x".into(),
            epoch: 0,
        };
        let (ev, err) = s.handle_input(&hello.to_bytes());
        assert!(err.is_none() && matches!(ev[0], Event::NeedHashes { .. }));
        s.hashes(&[]);
        s
    }

    #[test]
    fn a_zstd_bomb_in_data_is_a_protocol_error_not_an_allocation() {
        let bomb = zero_bomb(1 << 30);
        assert!(bomb.len() < 64 << 10);
        // It is a real bomb: far more than 4 KiB comes out of it.
        let mut head = Vec::new();
        let mut d = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut d, 8 << 20), &mut head).unwrap();
        assert_eq!(head.len(), 8 << 20);
        for compression in [Compression::Stream, Compression::Frame] {
            let mut s = applying();
            let data = Msg::Data {
                seq: 1,
                offset: 0,
                raw_len: 4096,
                compression,
                bytes: bomb.clone(),
            };
            let (ev, err) = s.handle_input(&data.to_bytes());
            let err = err.expect("a bomb is refused");
            assert!(ev.is_empty() && s.failed(), "{compression:?}: {err}");
            assert!(err.contains("DATA 1: zstd"), "{compression:?}: {err}");
        }
    }

    #[test]
    fn a_bounded_stream_decodes_what_the_primary_compresses() {
        let mut c = tern_codec::residual::Compressor::new(1).unwrap();
        let mut s = applying();
        for seq in 1..=20u64 {
            let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 + seq as u32) as u8).collect();
            let mut z = Vec::new();
            c.push(&data, &mut z).unwrap();
            let m = Msg::Data {
                seq,
                offset: seq * 65536,
                raw_len: data.len() as u32,
                compression: Compression::Stream,
                bytes: z,
            };
            let (ev, err) = s.handle_input(&m.to_bytes());
            assert!(err.is_none(), "{err:?}");
            assert_eq!(
                ev,
                vec![Event::Apply {
                    seq,
                    op: Op::Write {
                        offset: seq * 65536,
                        data
                    }
                }]
            );
        }
        // A piece that says less than it holds is refused.
        let mut z = Vec::new();
        c.push(&[5u8; 8192], &mut z).unwrap();
        let m = Msg::Data {
            seq: 21,
            offset: 0,
            raw_len: 4096,
            compression: Compression::Stream,
            bytes: z,
        };
        let err = s.handle_input(&m.to_bytes()).1.unwrap();
        assert!(err.contains("expands beyond"), "{err}");
    }

    #[test]
    fn a_primary_from_an_older_epoch_is_fenced() {
        let hello = |epoch| {
            Msg::Hello {
                version: wire::VERSION,
                size: 1 << 20,
                block_shift: crate::BLOCK_SHIFT,
                name: "x".into(),
                epoch,
            }
            .to_bytes()
        };
        // Promoted once: epoch 1. The old primary (epoch 0) is refused with an ERROR.
        let mut s = Secondary::new(1 << 20).with_epoch(1);
        let (ev, err) = s.handle_input(&hello(0));
        assert!(ev.is_empty() && s.failed());
        assert!(err.unwrap().contains("fenced"));
        assert!(
            !s.take_output().is_empty(),
            "an ERROR for the stale primary"
        );
        // The new primary (same or later epoch) is served, and a later one adopted.
        for e in [1, 2] {
            let mut s = Secondary::new(1 << 20).with_epoch(1);
            let (ev, err) = s.handle_input(&hello(e));
            assert!(err.is_none(), "{err:?}");
            assert_eq!(
                ev,
                vec![Event::NeedHashes {
                    name: "x".into(),
                    epoch: e
                }]
            );
        }
        // A HELLO without the epoch field (older primary) is epoch 0.
        let mut old = hello(0);
        old.truncate(old.len() - 8);
        let body = (old.len() - 5) as u32;
        old[1..5].copy_from_slice(&body.to_le_bytes());
        let mut s = Secondary::new(1 << 20).with_epoch(1);
        assert!(s.handle_input(&old).1.unwrap().contains("fenced"));
    }
}
