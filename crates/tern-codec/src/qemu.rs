//! Incremental parser of QEMU 7.2's precopy stream, far enough to find RAM pages.
//!
//! ```text
//! "QEVM" v3 | CONFIGURATION | COMMAND* | START ram (MEM_SIZE list, EOS, footer)
//!   | PART ram (records..., EOS, footer)* | END ram (..., EOS, footer)
//!   | FULL device sections... | EOF | VMDESCRIPTION          <- raw from the first FULL
//! RAM record: be64 (offset | flags) [u8 len + block idstr unless CONTINUE] payload
//!   ZERO 0x02: 1 byte   PAGE 0x08: 4096 bytes   XBZRLE 0x40: 1 + be16 len + len
//!   COMPRESS_PAGE 0x100: be32 len + zlib   MEM_SIZE 0x04 (START only)   EOS 0x10
//! ```
//! [`Parser::next`] looks at the unconsumed bytes and returns the next item once it is
//! complete (`None`: need more bytes; no state changes until an item completes). Anything
//! unknown, or a check that fails (footer, section id, block name, sizes), gives
//! [`Item::Raw`]: the caller passes every later byte through untouched.

use crate::PAGE;

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const F_XBZRLE: u64 = 0x40;
const F_COMPRESS: u64 = 0x100;
const KNOWN_FLAGS: u64 = F_ZERO | F_MEM_SIZE | F_PAGE | F_EOS | F_CONTINUE | F_XBZRLE | F_COMPRESS;
/// zlib's compressBound(4096).
const COMPRESS_BOUND: u32 = 4096 + 1 + 13;
const MAX_BLOCKS: usize = 4096;

/// The next piece of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// This many bytes, passed as they are.
    Verbatim(usize),
    /// A PAGE record: `header` bytes (word, maybe a block idstr), then 4096 page bytes.
    /// `key` names the page: block index << 40 | page index within the block.
    Page { header: usize, key: u64 },
    /// A ZERO record (the whole record is `len` bytes).
    Zero { len: usize },
    /// The rest cannot be parsed. `normal`: QEMU's RAM is complete (device state follows).
    Raw { reason: String, normal: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Ram,
    Raw,
}

#[derive(Debug, Clone)]
pub struct Parser {
    state: State,
    blocks: Vec<(Vec<u8>, u64)>,
    cur_block: Option<usize>,
    ram_section: Option<u32>,
    in_end: bool,
    ram_done: bool,
}

impl Default for Parser {
    fn default() -> Parser {
        Parser::new()
    }
}

struct Cur<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Cur<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.p..self.p.checked_add(n)?)?;
        self.p += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }
    fn be16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn be64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn counted(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.bytes(n)
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.p).copied()
    }
}

impl Parser {
    pub fn new() -> Parser {
        Parser {
            state: State::Header,
            blocks: Vec::new(),
            cur_block: None,
            ram_section: None,
            in_end: false,
            ram_done: false,
        }
    }

    /// RAM blocks announced in the MEM_SIZE list: (idstr, used length).
    pub fn blocks(&self) -> &[(Vec<u8>, u64)] {
        &self.blocks
    }

    fn raw(&mut self, reason: impl Into<String>) -> Option<Item> {
        self.state = State::Raw;
        Some(Item::Raw {
            reason: reason.into(),
            normal: self.ram_done,
        })
    }

    /// The next complete item at the start of `buf`, or `None` if more bytes are needed.
    pub fn next(&mut self, buf: &[u8]) -> Option<Item> {
        let mut c = Cur { b: buf, p: 0 };
        match self.state {
            State::Raw => Some(Item::Verbatim(buf.len())).filter(|_| !buf.is_empty()),
            State::Header => {
                let magic = c.be32()?;
                let version = c.be32()?;
                if magic != MAGIC || version != VERSION {
                    return self.raw(format!("stream header {magic:#x} v{version}"));
                }
                self.state = State::Top;
                Some(Item::Verbatim(8))
            }
            State::Top => self.top(c),
            State::Ram => self.ram(c),
        }
    }

    fn top(&mut self, mut c: Cur<'_>) -> Option<Item> {
        let t = c.u8()?;
        match t {
            CONFIGURATION => {
                let len = c.be32()? as usize;
                if len > 255 {
                    return self.raw("configuration name too long");
                }
                c.bytes(len)?;
                while c.peek()? == SUBSECTION {
                    c.u8()?;
                    let name = c.counted()?;
                    c.be32()?;
                    match name {
                        b"configuration/target-page-bits" => {
                            if c.be32()? != 12 {
                                return self.raw("target page size is not 4 KiB");
                            }
                        }
                        b"configuration/capabilities" => {
                            if c.be32()? != 0 {
                                return self.raw("validated capabilities (x-ignore-shared)");
                            }
                        }
                        b"configuration/uuid" => {
                            c.bytes(16)?;
                        }
                        other => {
                            return self.raw(format!(
                                "configuration subsection {}",
                                String::from_utf8_lossy(other)
                            ));
                        }
                    }
                }
                Some(Item::Verbatim(c.p))
            }
            COMMAND => {
                let cmd = c.be16()?;
                let len = c.be16()?;
                if cmd == 3 && len == 16 {
                    return self.raw("postcopy advise");
                }
                if cmd == 7 {
                    return self.raw("packaged stream (postcopy)");
                }
                c.bytes(len as usize)?;
                Some(Item::Verbatim(c.p))
            }
            SEC_START | SEC_FULL => {
                let id = c.be32()?;
                let name = c.counted()?;
                c.be32()?;
                c.be32()?;
                if t == SEC_START && name == b"ram" && self.ram_section.is_none() {
                    self.ram_section = Some(id);
                    self.in_end = false;
                    self.state = State::Ram;
                    return Some(Item::Verbatim(c.p));
                }
                let kind = if t == SEC_START {
                    "iterative"
                } else {
                    "device"
                };
                let name = String::from_utf8_lossy(name).into_owned();
                self.raw(format!("{kind} section {name}"))
            }
            SEC_PART | SEC_END => {
                let id = c.be32()?;
                if Some(id) != self.ram_section {
                    return self.raw(format!("section id {id} is not ram"));
                }
                self.in_end = t == SEC_END;
                self.state = State::Ram;
                Some(Item::Verbatim(c.p))
            }
            SEC_EOF => self.raw("end of stream"),
            other => self.raw(format!("record type {other:#04x}")),
        }
    }

    fn ram(&mut self, mut c: Cur<'_>) -> Option<Item> {
        let w = c.be64()?;
        let flags = w & 0xfff;
        let addr = w & !0xfff;
        if flags & !KNOWN_FLAGS != 0 {
            return self.raw(format!("RAM flags {flags:#x}"));
        }
        let cont = flags & F_CONTINUE != 0;
        let kind = flags & !F_CONTINUE;
        match kind {
            F_MEM_SIZE => {
                if cont || !self.blocks.is_empty() {
                    return self.raw("unexpected MEM_SIZE");
                }
                let mut blocks = Vec::new();
                let mut sum: u64 = 0;
                while sum < addr {
                    let name = c.counted()?.to_vec();
                    let len = c.be64()?;
                    sum = match sum.checked_add(len) {
                        Some(s) => s,
                        None => return self.raw("MEM_SIZE overflow"),
                    };
                    blocks.push((name, len));
                    if blocks.len() > MAX_BLOCKS {
                        return self.raw("too many RAM blocks");
                    }
                }
                if sum != addr {
                    return self.raw("MEM_SIZE list does not sum to the total");
                }
                self.blocks = blocks;
                Some(Item::Verbatim(c.p))
            }
            F_EOS => {
                let t = c.u8()?;
                let id = c.be32()?;
                if cont || t != FOOTER || Some(id) != self.ram_section {
                    return self.raw("section footer mismatch");
                }
                self.state = State::Top;
                if self.in_end {
                    self.ram_done = true;
                }
                Some(Item::Verbatim(c.p))
            }
            F_ZERO | F_PAGE | F_XBZRLE | F_COMPRESS => {
                let block = if cont {
                    match self.cur_block {
                        Some(b) => b,
                        None => return self.raw("CONTINUE before any block"),
                    }
                } else {
                    let name = c.counted()?;
                    match self.blocks.iter().position(|(n, _)| n == name) {
                        Some(b) => b,
                        None => return self.raw("unknown RAM block"),
                    }
                };
                if addr
                    .checked_add(PAGE as u64)
                    .is_none_or(|end| end > self.blocks[block].1)
                {
                    return self.raw("page beyond its block");
                }
                let header = c.p;
                let item = match kind {
                    F_ZERO => {
                        c.u8()?;
                        Item::Zero { len: c.p }
                    }
                    F_PAGE => {
                        c.bytes(PAGE)?;
                        Item::Page {
                            header,
                            key: (block as u64) << 40 | addr >> 12,
                        }
                    }
                    F_XBZRLE => {
                        let enc = c.u8()?;
                        let len = c.be16()?;
                        if enc != 1 || len as usize > PAGE {
                            return self.raw("bad XBZRLE header");
                        }
                        c.bytes(len as usize)?;
                        Item::Verbatim(c.p)
                    }
                    _ => {
                        let len = c.be32()?;
                        if len > COMPRESS_BOUND {
                            return self.raw("bad compressed page length");
                        }
                        c.bytes(len as usize)?;
                        Item::Verbatim(c.p)
                    }
                };
                self.cur_block = Some(block);
                Some(item)
            }
            _ => self.raw(format!("RAM flags {flags:#x}")),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small synthetic stream: header, configuration, ram START with two blocks, a PART
    /// with pages (literal, repeated, zero), END, a device section, EOF.
    pub fn synthetic(pages: &[(u64, [u8; 4])], iterations: usize) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.push(CONFIGURATION);
        s.extend_from_slice(&13u32.to_be_bytes());
        s.extend_from_slice(b"pc-i440fx-7.2");
        s.push(SEC_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(3);
        s.extend_from_slice(b"ram");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&4u32.to_be_bytes());
        let total: u64 = 0x10_0000 + 0x2000;
        s.extend_from_slice(&(total | F_MEM_SIZE).to_be_bytes());
        for (name, len) in [(&b"pc.ram"[..], 0x10_0000u64), (&b"pc.rom"[..], 0x2000)] {
            s.push(name.len() as u8);
            s.extend_from_slice(name);
            s.extend_from_slice(&len.to_be_bytes());
        }
        s.extend_from_slice(&F_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        for it in 0..iterations {
            s.push(if it + 1 == iterations {
                SEC_END
            } else {
                SEC_PART
            });
            s.extend_from_slice(&2u32.to_be_bytes());
            let mut first = true;
            for (i, (addr, seed)) in pages.iter().enumerate() {
                let zero = seed == &[0; 4];
                let flags = if zero { F_ZERO } else { F_PAGE } | if first { 0 } else { F_CONTINUE };
                s.extend_from_slice(&(addr | flags).to_be_bytes());
                if first {
                    s.push(6);
                    s.extend_from_slice(b"pc.ram");
                    first = false;
                }
                if zero {
                    s.push(0);
                } else {
                    let mut p = [0u8; PAGE];
                    for (j, b) in p.iter_mut().enumerate() {
                        *b = seed[j % 4]
                            .wrapping_add((j / 512) as u8)
                            .wrapping_add(if j % 1000 == 0 { (it + i) as u8 } else { 0 });
                    }
                    s.extend_from_slice(&p);
                }
            }
            s.extend_from_slice(&F_EOS.to_be_bytes());
            s.push(FOOTER);
            s.extend_from_slice(&2u32.to_be_bytes());
        }
        s.push(SEC_FULL);
        s.extend_from_slice(&0u32.to_be_bytes());
        s.push(5);
        s.extend_from_slice(b"timer");
        s.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3]);
        s.push(FOOTER);
        s.extend_from_slice(&0u32.to_be_bytes());
        s.push(SEC_EOF);
        s
    }

    fn items(stream: &[u8]) -> Vec<Item> {
        let mut p = Parser::new();
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < stream.len() {
            let it = p.next(&stream[pos..]).expect("complete stream");
            pos += match &it {
                Item::Verbatim(n) => *n,
                Item::Page { header, .. } => header + PAGE,
                Item::Zero { len } => *len,
                Item::Raw { .. } => stream.len() - pos,
            };
            out.push(it);
        }
        out
    }

    #[test]
    fn parses_pages_and_goes_raw_at_device_state() {
        let s = synthetic(
            &[(0, [1, 2, 3, 4]), (0x1000, [0; 4]), (0x2000, [5, 6, 7, 8])],
            2,
        );
        let it = items(&s);
        let pages = it.iter().filter(|i| matches!(i, Item::Page { .. })).count();
        let zeros = it.iter().filter(|i| matches!(i, Item::Zero { .. })).count();
        assert_eq!((pages, zeros), (4, 2));
        assert!(it.contains(&Item::Page { header: 15, key: 0 }));
        assert!(it.contains(&Item::Page { header: 8, key: 2 }));
        match it.last().unwrap() {
            Item::Raw { reason, normal } => {
                assert!(reason.contains("device section timer"), "{reason}");
                assert!(normal);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn incomplete_items_wait_and_change_nothing() {
        let s = synthetic(&[(0, [1, 2, 3, 4]), (0x1000, [0; 4])], 2);
        let mut p = Parser::new();
        let mut pos = 0;
        loop {
            let before = format!("{p:?}");
            let item = p.clone().next(&s[pos..]).expect("complete");
            let n = match item {
                Item::Verbatim(n) => n,
                Item::Page { header, .. } => header + PAGE,
                Item::Zero { len } => len,
                Item::Raw { .. } => break,
            };
            for cut in 0..n {
                let mut q = p.clone();
                if let Some(it) = q.next(&s[pos..pos + cut]) {
                    // Only a configuration item may complete early (it peeks one byte past).
                    panic!("prefix {cut} of {n} gave {it:?}");
                }
                assert_eq!(format!("{q:?}"), before);
            }
            assert_eq!(p.next(&s[pos..]), Some(item));
            pos += n;
        }
    }

    #[test]
    fn unknown_things_go_raw() {
        let mut s = synthetic(&[(0, [1, 2, 3, 4])], 1);
        // Corrupt the START footer's section id.
        let at = s
            .windows(5)
            .position(|w| w == [FOOTER, 0, 0, 0, 2])
            .unwrap();
        s[at + 4] = 9;
        let it = items(&s);
        assert!(
            matches!(it.last().unwrap(), Item::Raw { reason, normal: false } if reason.contains("footer"))
        );
        let mut bad = synthetic(&[], 1);
        bad[0] = b'X';
        assert!(matches!(&items(&bad)[0], Item::Raw { normal: false, .. }));
    }
}
