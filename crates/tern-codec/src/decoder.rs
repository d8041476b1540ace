//! The receiving end: frames in, QEMU's exact bytes out.

use crate::cache::{self, PageCache, SubBlockRing};
use crate::residual::Decompressor;
use crate::store::{ContentStore, Key, page_key};
use crate::wire::{self, get_varint};
use crate::{Options, PAGE, SUB, SUBS, delta};

/// Most QEMU bytes one [`Decoder::push`] may produce. Frames expand (a 17-byte store
/// reference or a 15-byte frame of sub-block references rebuilds a 4 KiB page, and residual
/// zstd multiplies that by up to ~32768), so a few KiB from a hostile peer could otherwise
/// ask for gigabytes. Reaching it is [`DecodeError::OutputLimit`], checked before the bytes
/// are appended. The node pushes one transport read (a few hundred KiB) at a time.
pub const MAX_PUSH_OUTPUT_BYTES: u64 = 256 << 20;
/// Most bytes of frames one push may decompress from the residual zstd stream (frames that
/// produce no output, such as empty RAW frames, cost CPU without counting above). Reaching
/// it is [`DecodeError::ZstdLimit`]; nothing beyond it is decompressed.
pub const MAX_PUSH_FRAME_BYTES: u64 = 256 << 20;
/// Residual zstd is decompressed and its frames decoded this many bytes at a time, so the
/// decompressed frames held at once are bounded (plus one incomplete frame, at most
/// [`wire::MAX_FRAME`]).
pub const RESIDUAL_STEP_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "one push decodes to more than {limit} bytes (encoded offset {offset}): refused as a decompression bomb"
    )]
    OutputLimit { offset: u64, limit: u64 },
    #[error(
        "residual zstd stream decompresses to more than {limit} bytes in one push: refused as a decompression bomb"
    )]
    ZstdLimit { limit: u64 },
    #[error("bad frame at encoded offset {offset}: {what}")]
    Frame { offset: u64, what: &'static str },
    #[error("sub-block reference {distance} back is not in the cache (encoded offset {offset})")]
    Ref { offset: u64, distance: u64 },
    #[error("delta for a page never sent before (encoded offset {offset})")]
    NoBase { offset: u64 },
    #[error("page {key:02x?} is not in the content store (encoded offset {offset})")]
    StoreMiss { offset: u64, key: Key },
    #[error("residual zstd stream: {0}")]
    Zstd(String),
    #[error("page at encoded offset {offset} does not match its check (codec state diverged)")]
    Check { offset: u64 },
}

#[derive(Debug)]
pub struct Decoder {
    opts: Options,
    buf: Vec<u8>,
    consumed: u64,
    raw_tail: bool,
    ring: Option<SubBlockRing>,
    pages: Option<PageCache>,
    last_word: Option<u64>,
    last_block: u64,
    page: Vec<u8>,
    zstd: Option<Decompressor>,
    frames: Vec<u8>,
    /// QEMU bytes the current push may still produce (see [`MAX_PUSH_OUTPUT_BYTES`]).
    out_budget: u64,
    /// Pages decoded.
    pub pages_out: u64,
    /// Bytes written to QEMU.
    pub output_bytes: u64,
}

fn frame_err(offset: u64, what: &'static str) -> DecodeError {
    DecodeError::Frame { offset, what }
}

impl Decoder {
    pub fn new(opts: Options) -> Decoder {
        Decoder::with_capacity(opts, cache::RING_BLOCKS, cache::CACHE_PAGES)
    }

    pub fn with_capacity(opts: Options, ring_blocks: usize, cache_pages: usize) -> Decoder {
        Decoder {
            opts,
            buf: Vec::new(),
            consumed: 0,
            raw_tail: false,
            ring: opts.re.then(|| SubBlockRing::new(ring_blocks, false)),
            pages: opts.delta.then(|| PageCache::new(cache_pages)),
            last_word: None,
            last_block: 0,
            page: vec![0; PAGE],
            zstd: opts
                .zstd
                .then(|| Decompressor::new().expect("zstd context")),
            frames: Vec::new(),
            out_budget: 0,
            pages_out: 0,
            output_bytes: 0,
        }
    }

    /// Decodes the next encoded bytes into `out`. Decoded pages are added to `store` when the
    /// store optimization is on.
    pub fn push(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        store: &mut dyn ContentStore,
    ) -> Result<(), DecodeError> {
        let start = out.len();
        self.out_budget = MAX_PUSH_OUTPUT_BYTES;
        let r = match self.zstd.take() {
            None => self.push_inner(data, out, store),
            Some(mut z) => {
                let r = self.push_residual(&mut z, data, out, store);
                self.zstd = Some(z);
                r
            }
        };
        self.output_bytes += (out.len() - start) as u64;
        r
    }

    /// Decompresses `data` a step at a time, decoding each step's frames before the next.
    fn push_residual(
        &mut self,
        z: &mut Decompressor,
        data: &[u8],
        out: &mut Vec<u8>,
        store: &mut dyn ContentStore,
    ) -> Result<(), DecodeError> {
        let mut frames = std::mem::take(&mut self.frames);
        let mut pos = 0;
        let mut decompressed: u64 = 0;
        let r = loop {
            frames.clear();
            let done = match z.step(data, &mut pos, &mut frames, RESIDUAL_STEP_BYTES) {
                Ok(done) => done,
                Err(e) => break Err(DecodeError::Zstd(e.to_string())),
            };
            decompressed += frames.len() as u64;
            if decompressed > MAX_PUSH_FRAME_BYTES {
                break Err(DecodeError::ZstdLimit {
                    limit: MAX_PUSH_FRAME_BYTES,
                });
            }
            if let Err(e) = self.push_inner(&frames, out, store) {
                break Err(e);
            }
            if done {
                break Ok(());
            }
        };
        frames.clear();
        self.frames = frames;
        r
    }

    /// Takes `n` bytes of this push's output budget.
    fn spend(&mut self, n: usize) -> Result<(), DecodeError> {
        match self.out_budget.checked_sub(n as u64) {
            Some(left) => {
                self.out_budget = left;
                Ok(())
            }
            None => Err(DecodeError::OutputLimit {
                offset: self.consumed,
                limit: MAX_PUSH_OUTPUT_BYTES,
            }),
        }
    }

    fn push_inner(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        store: &mut dyn ContentStore,
    ) -> Result<(), DecodeError> {
        if self.raw_tail {
            self.spend(data.len())?;
            out.extend_from_slice(data);
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(data);
        let mut pos = 0;
        let r = loop {
            if self.raw_tail {
                if let Err(e) = self.spend(buf.len() - pos) {
                    break Err(e);
                }
                out.extend_from_slice(&buf[pos..]);
                pos = buf.len();
                break Ok(());
            }
            match self.frame(&buf[pos..], out, store) {
                Ok(Some(n)) => {
                    pos += n;
                    self.consumed += n as u64;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        buf.drain(..pos);
        self.buf = buf;
        r
    }

    /// Whether input ended cleanly (no partial frame pending).
    pub fn is_clean(&self) -> bool {
        self.buf.is_empty()
    }

    /// One frame at the start of `b`: bytes used, or `None` if incomplete. No state changes
    /// unless complete.
    fn frame(
        &mut self,
        b: &[u8],
        out: &mut Vec<u8>,
        store: &mut dyn ContentStore,
    ) -> Result<Option<usize>, DecodeError> {
        let off = self.consumed;
        let Some(&t) = b.first() else { return Ok(None) };
        let varint = |at: usize| -> Result<Option<(u64, usize)>, DecodeError> {
            get_varint(&b[at.min(b.len())..]).map_err(|()| frame_err(off, "bad varint"))
        };
        match t {
            wire::RAW => {
                let Some((len, u)) = varint(1)? else {
                    return Ok(None);
                };
                if len > wire::MAX_FRAME {
                    return Err(frame_err(off, "raw frame too long"));
                }
                let end = 1 + u + len as usize;
                if b.len() < end {
                    return Ok(None);
                }
                self.spend(len as usize)?;
                out.extend_from_slice(&b[1 + u..end]);
                Ok(Some(end))
            }
            wire::RAW_TAIL => {
                self.raw_tail = true;
                Ok(Some(1))
            }
            wire::PAGE_HDR | wire::PAGE_NEXT => {
                let mut p = 1;
                let (hdr_at, hlen, word, block);
                if t == wire::PAGE_HDR {
                    let Some((len, u)) = varint(p)? else {
                        return Ok(None);
                    };
                    if !(8..=8 + 256).contains(&len) {
                        return Err(frame_err(off, "bad page header length"));
                    }
                    p += u;
                    if b.len() < p + len as usize {
                        return Ok(None);
                    }
                    hdr_at = Some(p);
                    hlen = len as usize;
                    word = u64::from_be_bytes(b[p..p + 8].try_into().expect("8 bytes"));
                    p += hlen;
                    let Some((blk, u)) = varint(p)? else {
                        return Ok(None);
                    };
                    if blk >= 1 << 24 {
                        return Err(frame_err(off, "bad block index"));
                    }
                    block = blk;
                    p += u;
                } else {
                    let Some(w) = self.last_word else {
                        return Err(frame_err(off, "PAGE_NEXT without a previous page"));
                    };
                    hdr_at = None;
                    hlen = 8;
                    word = w.wrapping_add(PAGE as u64);
                    block = self.last_block;
                }
                let key = block << 40 | (word >> 12 & ((1 << 40) - 1));
                let Some(body_len) = self.body(b, p, off, key, store)? else {
                    return Ok(None);
                };
                let Some(check) = b.get(p + body_len..p + body_len + 4) else {
                    return Ok(None);
                };
                if u32::from_le_bytes(check.try_into().expect("4 bytes"))
                    != crate::encoder::page_check(&self.page)
                {
                    return Err(DecodeError::Check { offset: off });
                }
                // Complete: emit header and page, update the mirrored state.
                self.spend(hlen + PAGE)?;
                match hdr_at {
                    Some(at) => out.extend_from_slice(&b[at..at + hlen]),
                    None => out.extend_from_slice(&word.to_be_bytes()),
                }
                out.extend_from_slice(&self.page);
                self.last_word = Some(word);
                self.last_block = block;
                self.pages_out += 1;
                let kinds = if b[p] == wire::BODY_SUBS {
                    Some(b[p + 1])
                } else {
                    None
                };
                if let Some(ring) = &mut self.ring {
                    for i in 0..SUBS {
                        let sb = &self.page[i * SUB..(i + 1) * SUB];
                        let literal = match kinds {
                            Some(k) => k >> (2 * i) & 3 == wire::SUB_LITERAL,
                            None => sb.iter().any(|&x| x != 0),
                        };
                        if literal {
                            ring.push(sb, 0);
                        }
                    }
                }
                if let Some(c) = &mut self.pages {
                    c.insert(key, &self.page);
                }
                if self.opts.store {
                    store.insert(&page_key(&self.page), &self.page);
                }
                Ok(Some(p + body_len + 4))
            }
            _ => Err(frame_err(off, "unknown frame type")),
        }
    }

    /// Decodes a page body at `b[p..]` into `self.page`: body length, or `None` if
    /// incomplete (then `self.page` may hold garbage, which is fine: it is rewritten).
    fn body(
        &mut self,
        b: &[u8],
        p: usize,
        off: u64,
        key: u64,
        store: &mut dyn ContentStore,
    ) -> Result<Option<usize>, DecodeError> {
        let Some(&kind) = b.get(p) else {
            return Ok(None);
        };
        let rest = &b[p + 1..];
        match kind {
            wire::BODY_LITERAL => {
                if rest.len() < PAGE {
                    return Ok(None);
                }
                self.page.copy_from_slice(&rest[..PAGE]);
                Ok(Some(1 + PAGE))
            }
            wire::BODY_SUBS => {
                let Some(&kinds) = rest.first() else {
                    return Ok(None);
                };
                let mut q = 1;
                for i in 0..SUBS {
                    let dst = i * SUB..(i + 1) * SUB;
                    match kinds >> (2 * i) & 3 {
                        wire::SUB_ZERO => self.page[dst].fill(0),
                        wire::SUB_REF => {
                            let Some((d, u)) = get_varint(&rest[q..])
                                .map_err(|()| frame_err(off, "bad varint"))?
                            else {
                                return Ok(None);
                            };
                            q += u;
                            let ring = self
                                .ring
                                .as_ref()
                                .ok_or(frame_err(off, "reference without RE"))?;
                            let src = ring
                                .next_seq()
                                .checked_sub(d)
                                .filter(|_| d > 0)
                                .and_then(|s| ring.get(s))
                                .ok_or(DecodeError::Ref {
                                    offset: off,
                                    distance: d,
                                })?;
                            self.page[dst].copy_from_slice(src);
                        }
                        wire::SUB_LITERAL => {
                            if rest.len() < q + SUB {
                                return Ok(None);
                            }
                            self.page[dst].copy_from_slice(&rest[q..q + SUB]);
                            q += SUB;
                        }
                        _ => return Err(frame_err(off, "bad sub-block kind")),
                    }
                }
                Ok(Some(1 + q))
            }
            wire::BODY_DELTA => {
                let Some((len, u)) = get_varint(rest).map_err(|()| frame_err(off, "bad varint"))?
                else {
                    return Ok(None);
                };
                if len > PAGE as u64 * 2 {
                    return Err(frame_err(off, "delta too long"));
                }
                if rest.len() < u + len as usize {
                    return Ok(None);
                }
                let base = self
                    .pages
                    .as_ref()
                    .and_then(|c| c.get(key))
                    .ok_or(DecodeError::NoBase { offset: off })?;
                self.page.copy_from_slice(base);
                delta::apply(&mut self.page, &rest[u..u + len as usize])
                    .map_err(|_| frame_err(off, "bad delta"))?;
                Ok(Some(1 + u + len as usize))
            }
            wire::BODY_STORE => {
                if rest.len() < 16 {
                    return Ok(None);
                }
                let k: Key = rest[..16].try_into().expect("16 bytes");
                if !store.get(&k, &mut self.page) {
                    return Err(DecodeError::StoreMiss {
                        offset: off,
                        key: k,
                    });
                }
                Ok(Some(17))
            }
            _ => Err(frame_err(off, "bad page body kind")),
        }
    }
}
