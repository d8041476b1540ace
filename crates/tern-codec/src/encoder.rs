//! The sending end: parses QEMU's bytes and writes frames (`wire.rs`).

use crate::cache::{self, PageCache, SubBlockRing, block_hash};
use crate::qemu::{Item, Parser};
use crate::residual::{self, Compressor};
use crate::store::{ContentStore, Key, Summary, page_key};
use crate::wire::{self, put_varint, varint_len};
use crate::{Options, PAGE, SUB, SUBS, Stats, delta};

/// A delta is used only when it is at most this fraction of a page (larger deltas lose to a
/// literal after residual compression).
const DELTA_LIMIT: usize = PAGE * 3 / 4;

/// The 4-byte check that follows every page body.
pub fn page_check(page: &[u8]) -> u32 {
    let h = block_hash(page);
    (h ^ (h >> 32)) as u32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Literal,
    Subs,
    Delta,
    Store,
}

#[derive(Debug)]
pub struct Encoder {
    opts: Options,
    parser: Parser,
    input: Vec<u8>,
    raw_tail: bool,
    ring: Option<SubBlockRing>,
    pages: Option<PageCache>,
    summary: Option<Summary>,
    last_word: Option<u64>,
    last_block: u64,
    pending: Vec<u8>,
    scratch: Vec<u8>,
    zstd: Option<Compressor>,
    frames: Vec<u8>,
    stats: Stats,
}

impl Encoder {
    pub fn new(opts: Options) -> Encoder {
        Encoder::with_capacity(opts, cache::RING_BLOCKS, cache::CACHE_PAGES)
    }

    /// `ring_blocks` 1 KiB sub-blocks for RE, `cache_pages` pages for deltas; the decoder
    /// must use the same numbers.
    pub fn with_capacity(opts: Options, ring_blocks: usize, cache_pages: usize) -> Encoder {
        Encoder {
            opts,
            parser: Parser::new(),
            input: Vec::new(),
            raw_tail: false,
            ring: opts.re.then(|| SubBlockRing::new(ring_blocks, true)),
            pages: opts.delta.then(|| PageCache::new(cache_pages)),
            summary: None,
            last_word: None,
            last_block: 0,
            pending: Vec::new(),
            scratch: Vec::with_capacity(PAGE),
            zstd: opts
                .zstd
                .then(|| Compressor::new(residual::DEFAULT_LEVEL).expect("zstd context")),
            frames: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Sets the residual zstd level (1..=19; the stream is unaffected if zstd is off).
    pub fn with_zstd_level(mut self, level: i32) -> Encoder {
        if self.opts.zstd {
            self.zstd = Some(Compressor::new(level.clamp(1, 19)).expect("zstd context"));
        }
        self
    }

    pub fn options(&self) -> Options {
        self.opts
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What the destination's store holds; until it arrives no store references are sent.
    pub fn set_summary(&mut self, s: Summary) {
        self.summary = Some(s);
    }

    pub fn has_summary(&self) -> bool {
        self.summary.is_some()
    }

    /// Encodes the next QEMU bytes into `out`. Pages sent are added to `store` when the store
    /// optimization is on (so this site can receive the VM back cheaply).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>, store: &mut dyn ContentStore) {
        self.with_residual(out, |enc, frames| enc.push_frames(data, frames, store));
    }

    /// QEMU closed its end: bytes the parser was still waiting on go out raw.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.with_residual(out, |enc, frames| enc.finish_frames(frames));
    }

    fn with_residual(&mut self, out: &mut Vec<u8>, f: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        let start = out.len();
        if self.zstd.is_none() {
            f(self, out);
        } else {
            let mut frames = std::mem::take(&mut self.frames);
            frames.clear();
            f(self, &mut frames);
            if !frames.is_empty() {
                self.zstd
                    .as_mut()
                    .expect("checked")
                    .push(&frames, out)
                    .expect("zstd compression of an in-memory buffer");
            }
            self.stats.zstd_saved = (self.stats.zstd_saved + frames.len() as u64)
                .saturating_sub((out.len() - start) as u64);
            self.frames = frames;
        }
        self.stats.output_bytes += (out.len() - start) as u64;
    }

    fn push_frames(&mut self, data: &[u8], out: &mut Vec<u8>, store: &mut dyn ContentStore) {
        let start = out.len();
        self.stats.input_bytes += data.len() as u64;
        if self.raw_tail {
            out.extend_from_slice(data);
            self.stats.verbatim_bytes += data.len() as u64;
            self.stats.frame_bytes += data.len() as u64;
            return;
        }
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(data);
        let mut pos = 0;
        while let Some(item) = self.parser.next(&input[pos..]) {
            match item {
                Item::Verbatim(n) | Item::Zero { len: n } => {
                    if matches!(item, Item::Zero { .. }) {
                        self.stats.zero_pages += 1;
                    }
                    self.pending.extend_from_slice(&input[pos..pos + n]);
                    self.stats.verbatim_bytes += n as u64;
                    pos += n;
                }
                Item::Page { header, key } => {
                    self.flush_pending(out);
                    let rec = &input[pos..pos + header + PAGE];
                    self.page(&rec[..header], &rec[header..], key, out, store);
                    pos += header + PAGE;
                }
                Item::Raw { reason, normal } => {
                    if !normal {
                        self.stats.fallback = Some(reason);
                    }
                    self.flush_pending(out);
                    out.push(wire::RAW_TAIL);
                    out.extend_from_slice(&input[pos..]);
                    self.stats.verbatim_bytes += (input.len() - pos) as u64;
                    pos = input.len();
                    self.raw_tail = true;
                    break;
                }
            }
        }
        self.flush_pending(out);
        input.drain(..pos);
        self.input = input;
        self.stats.frame_bytes += (out.len() - start) as u64;
    }

    fn finish_frames(&mut self, out: &mut Vec<u8>) {
        if !self.raw_tail && !self.input.is_empty() {
            let start = out.len();
            self.stats.fallback = Some("stream ended inside a record".into());
            out.push(wire::RAW_TAIL);
            out.extend_from_slice(&self.input);
            self.stats.verbatim_bytes += self.input.len() as u64;
            self.input.clear();
            self.raw_tail = true;
            self.stats.frame_bytes += (out.len() - start) as u64;
        }
    }

    fn flush_pending(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            out.push(wire::RAW);
            put_varint(out, self.pending.len() as u64);
            out.extend_from_slice(&self.pending);
            self.pending.clear();
        }
    }

    fn page(
        &mut self,
        header: &[u8],
        page: &[u8],
        key: u64,
        out: &mut Vec<u8>,
        store: &mut dyn ContentStore,
    ) {
        self.stats.pages += 1;
        let word = u64::from_be_bytes(header[..8].try_into().expect("8-byte word"));
        let block = key >> 40;
        if header.len() == 8
            && block == self.last_block
            && self
                .last_word
                .is_some_and(|w| w.wrapping_add(PAGE as u64) == word)
        {
            out.push(wire::PAGE_NEXT);
        } else {
            out.push(wire::PAGE_HDR);
            put_varint(out, header.len() as u64);
            out.extend_from_slice(header);
            put_varint(out, block);
        }
        self.last_word = Some(word);
        self.last_block = block;

        // Candidates, by encoded body size.
        let mut best = (1 + PAGE, Body::Literal);
        let mut subs = [(wire::SUB_LITERAL, 0u64, 0u64); SUBS]; // (kind, ref seq, hash)
        let mut subs_size = 2;
        for (i, s) in subs.iter_mut().enumerate() {
            let b = &page[i * SUB..(i + 1) * SUB];
            if b.iter().all(|&x| x == 0) {
                s.0 = wire::SUB_ZERO;
                continue;
            }
            let h = if self.ring.is_some() {
                block_hash(b)
            } else {
                0
            };
            s.2 = h;
            if let Some(ring) = &self.ring
                && let Some(seq) = ring.find(b, h)
            {
                *s = (wire::SUB_REF, seq, h);
                subs_size += varint_len(ring.next_seq() - seq);
                continue;
            }
            subs_size += SUB;
        }
        if subs_size < best.0 {
            best = (subs_size, Body::Subs);
        }
        self.scratch.clear();
        if let Some(cache) = &self.pages
            && let Some(old) = cache.get(key)
            && delta::encode(old, page, DELTA_LIMIT, &mut self.scratch)
        {
            let size = 1 + varint_len(self.scratch.len() as u64) + self.scratch.len();
            if size < best.0 {
                best = (size, Body::Delta);
            }
        }
        let skey: Option<Key> = self.opts.store.then(|| page_key(page));
        if let (Some(k), Some(sum)) = (&skey, &self.summary)
            && sum.contains(k)
            && 17 < best.0
        {
            best = (17, Body::Store);
        }

        let saved = (PAGE + 1).saturating_sub(best.0) as u64;
        match best.1 {
            Body::Literal => {
                out.push(wire::BODY_LITERAL);
                out.extend_from_slice(page);
                self.stats.literal_pages += 1;
            }
            Body::Subs => {
                out.push(wire::BODY_SUBS);
                let kinds = subs
                    .iter()
                    .enumerate()
                    .fold(0u8, |k, (i, s)| k | s.0 << (2 * i));
                out.push(kinds);
                let next = self.ring.as_ref().map_or(0, |r| r.next_seq());
                for (i, s) in subs.iter().enumerate() {
                    match s.0 {
                        wire::SUB_ZERO => {
                            self.stats.zero_subblocks += 1;
                            self.stats.zero_saved += SUB as u64;
                        }
                        wire::SUB_REF => {
                            let d = next - s.1;
                            put_varint(out, d);
                            self.stats.re_hits += 1;
                            self.stats.re_saved += (SUB - varint_len(d)) as u64;
                        }
                        _ => out.extend_from_slice(&page[i * SUB..(i + 1) * SUB]),
                    }
                }
                if subs.iter().all(|s| s.0 != wire::SUB_REF) {
                    self.stats.literal_pages += 1;
                }
            }
            Body::Delta => {
                out.push(wire::BODY_DELTA);
                put_varint(out, self.scratch.len() as u64);
                out.extend_from_slice(&self.scratch);
                self.stats.delta_pages += 1;
                self.stats.delta_saved += saved;
            }
            Body::Store => {
                out.push(wire::BODY_STORE);
                out.extend_from_slice(skey.as_ref().expect("store candidate has a key"));
                self.stats.store_hits += 1;
                self.stats.store_saved += saved;
            }
        }

        // End-to-end check of the rebuilt page: a divergence of the two ends' caches (a bug)
        // becomes a clean migration failure instead of a wrong page in the guest.
        out.extend_from_slice(&page_check(page).to_le_bytes());

        // Mirrored state: identical steps in the decoder.
        if let Some(ring) = &mut self.ring {
            for (i, s) in subs.iter().enumerate() {
                let sent_literal = match best.1 {
                    Body::Subs => s.0 == wire::SUB_LITERAL,
                    _ => s.0 != wire::SUB_ZERO,
                };
                if sent_literal {
                    ring.push(&page[i * SUB..(i + 1) * SUB], s.2);
                }
            }
        }
        if let Some(cache) = &mut self.pages {
            cache.insert(key, page);
        }
        if let Some(k) = &skey {
            store.insert(k, page);
        }
    }
}
