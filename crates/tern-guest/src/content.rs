//! Content generators: prose, C source, object code, database rows and Java heap objects,
//! one 4 KiB page at a time, all derived from a seed.
//!
//! Why not random bytes: migration moves memory through zstd, page deduplication and page
//! deltas, and each of those behaves on random data nothing like on a real guest. These
//! generators aim at real data's statistics: words and identifiers drawn with a skewed
//! (Zipf-like) frequency from fixed vocabularies, boilerplate that repeats, numbers with few
//! significant digits. Each fills the page completely (every byte is written), so the
//! page's content is a function of (generator, seed) alone.

use std::sync::OnceLock;

use crate::rng::Rng;

/// Writes into one page, truncating the last item at the page end.
#[derive(Debug)]
pub struct PageWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> PageWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn full(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.remaining());
        let dst = &mut self.buf[self.pos..self.pos + n];
        let src = &bytes[..n];
        // Words and tokens are short: two overlapping word moves instead of a memcpy call
        // (the fill is instruction-bound under TCG).
        match n {
            8..=16 => {
                dst[..8].copy_from_slice(&src[..8]);
                dst[n - 8..].copy_from_slice(&src[n - 8..]);
            }
            4..=7 => {
                dst[..4].copy_from_slice(&src[..4]);
                dst[n - 4..].copy_from_slice(&src[n - 4..]);
            }
            0..=3 => {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = *s;
                }
            }
            _ => dst.copy_from_slice(src),
        }
        self.pos += n;
    }

    pub fn str(&mut self, s: &str) {
        self.put(s.as_bytes());
    }

    pub fn byte(&mut self, b: u8) {
        if self.pos < self.buf.len() {
            self.buf[self.pos] = b;
            self.pos += 1;
        }
    }

    /// A vocabulary word: one fixed-size copy on the fast path (the bytes copied past the
    /// word are overwritten by whatever comes next; every generator fills its whole page).
    pub fn word(&mut self, w: &Word) {
        if self.remaining() >= Word::CAP {
            self.buf[self.pos..self.pos + Word::CAP].copy_from_slice(&w.bytes);
            self.pos += w.len as usize;
        } else {
            self.put(w.as_bytes());
        }
    }

    /// A word followed by its separator (space, or `_` for identifier pieces).
    pub fn word_sep(&mut self, w: &Word) {
        if self.remaining() >= Word::CAP {
            self.buf[self.pos..self.pos + Word::CAP].copy_from_slice(&w.bytes);
            self.pos += w.len as usize + 1;
        } else {
            self.put(w.as_bytes());
            self.byte(w.bytes[Word::CAP - 1]);
        }
    }

    /// Upper-cases the byte at `at` (a sentence start), if it was written.
    pub fn upcase(&mut self, at: usize) {
        if at < self.pos {
            self.buf[at] = self.buf[at].to_ascii_uppercase();
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Decimal without allocation.
    pub fn num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }

    /// Pads the rest of the page with `fill`.
    pub fn pad(&mut self, fill: u8) {
        self.buf[self.pos..].fill(fill);
        self.pos = self.buf.len();
    }
}

/// Common English words, most frequent first (the order matters: [`Rng::skewed`] favours
/// the front).
const WORDS: &str = "the of and to a in is that for it as with be on not this by are or from \
    at which an but if can when all will there one has each more may other into only used data \
    must then some should new any these time first also so than two memory page device driver \
    kernel system value file buffer user queue network support interface number state list \
    function before after while where would could every without between through during \
    because however again return error called current process request address default example \
    structure reference possible different following available information configuration \
    operation allocation implementation hardware software performance behaviour transfer \
    register interrupt mapping context packet socket thread lock count size table entry range \
    offset length block cache flush write read open close start stop reset update change check \
    handle release acquire wait signal timer clock event message channel stream frame header \
    payload format version option parameter argument result status flag mode level limit \
    maximum minimum always never usually simply directly instead already still even here now \
    how why what who they their them we our you your its have had was were been being does did \
    make made take give find keep need know think look want use work call try ask seem feel \
    leave put mean let begin show hear play run move live believe hold bring happen provide sit \
    stand lose pay meet include continue set learn lead understand watch follow create speak \
    allow add spend grow offer remember consider appear buy serve send expect build stay fall \
    reach remain suggest raise pass sell require report decide pull small large early late long \
    short high low old young important public private local global real simple single free \
    full empty main common special certain clear recent whole similar physical virtual remote \
    shared static dynamic internal external valid invalid correct previous";

/// Pieces of kernel-style identifiers.
const IDENT: &str = "dev net skb buf page queue lock irq mem data ctx priv init exit alloc \
    free get put read write xmit rx tx dma reg map unmap list node entry count size len flags \
    state pci virtio ring desc vq hdr msg req resp cmd id idx timer work cpu task file inode sb \
    blk bio sg addr port phy link stats config ops cb fn handler probe remove suspend resume \
    update check setup start stop reset enable disable wait wake event notify poll mask shift \
    max min";

const TYPES: &[&str] = &[
    "int",
    "unsigned int",
    "u32",
    "u64",
    "u16",
    "u8",
    "size_t",
    "bool",
    "long",
    "unsigned long",
    "void *",
    "char *",
    "const char *",
    "dma_addr_t",
    "gfp_t",
    "loff_t",
];

const STRUCTS: &[&str] = &[
    "net_device",
    "sk_buff",
    "virtqueue",
    "virtio_device",
    "pci_dev",
    "device",
    "page",
    "file",
    "inode",
    "super_block",
    "request",
    "bio",
    "work_struct",
    "timer_list",
    "list_head",
    "mutex",
    "spinlock",
    "scatterlist",
    "napi_struct",
    "ethtool_ops",
];

const ERRNOS: &[&str] = &[
    "EINVAL",
    "ENOMEM",
    "EBUSY",
    "EIO",
    "EAGAIN",
    "ENODEV",
    "EFAULT",
    "ENOSPC",
    "ETIMEDOUT",
    "EOPNOTSUPP",
    "EPERM",
    "ENOENT",
];

const INCLUDES: &[&str] = &[
    "linux/module.h",
    "linux/kernel.h",
    "linux/slab.h",
    "linux/init.h",
    "linux/errno.h",
    "linux/types.h",
    "linux/list.h",
    "linux/mutex.h",
    "linux/spinlock.h",
    "linux/netdevice.h",
    "linux/skbuff.h",
    "linux/virtio.h",
    "linux/virtio_net.h",
    "linux/pci.h",
    "linux/mm.h",
    "linux/dma-mapping.h",
    "linux/interrupt.h",
    "linux/workqueue.h",
    "linux/scatterlist.h",
];

/// The boilerplate at the head of every C file (a sub-page run that repeats across files).
const LICENSE: &str = "// SPDX-License-Identifier: GPL-2.0-or-later\n/*\n * This program is free \
    software; you can redistribute it and/or modify it\n * under the terms of the GNU General \
    Public License as published by the Free\n * Software Foundation; either version 2 of the \
    License, or (at your option)\n * any later version.\n */\n\n";

const FIRST_NAMES: &str = "James Mary John Patricia Robert Jennifer Michael Linda William \
    Elizabeth David Barbara Richard Susan Joseph Jessica Thomas Sarah Charles Karen Daniel Nancy \
    Matthew Lisa Anthony Betty Mark Margaret Donald Sandra Steven Ashley Paul Kimberly Andrew \
    Emily Joshua Donna Kenneth Michelle Kevin Carol Brian Amanda George Melissa Timothy Deborah";

const LAST_NAMES: &str = "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez \
    Martinez Hernandez Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee \
    Perez Thompson White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King \
    Wright Scott Torres Nguyen Hill Flores";

const STREETS: &str = "Main Oak Pine Maple Cedar Elm Washington Lake Hill Park Sunset Lincoln \
    Church River Highland Forest Jefferson Madison";

const STREET_KINDS: &[&str] = &["St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Ct", "Way"];

/// City and state pairs.
const CITIES: &str = "Springfield|IL Riverside|CA Franklin|TN Greenville|SC Madison|WI \
    Georgetown|TX Salem|OR Fairview|NJ Clinton|IA Arlington|VA Ashland|KY Dover|DE \
    Burlington|VT Auburn|AL Milton|MA Oxford|MS";

const EMAIL_DOMAINS: &[&str] = &["example.com", "mail.example.org", "shop.example.net"];

const TITLE_WORDS: &str = "Complete Guide to Modern Systems Networks Databases History of the \
    Art Programming Practical Introduction Advanced Design Patterns Cooking Travel Garden World \
    Science Handbook Essential Theory Music Poetry Stories Collected Works Volume Edition";

const ORDER_STATES: &[&str] = &["PENDING", "PROCESSING", "SHIPPED", "DENIED", "RETURNED"];

/// A vocabulary entry padded to 16 bytes, so emitting it is one fixed-size copy (the fill
/// is instruction-bound under TCG, and words are most of what it writes).
#[derive(Debug, Clone, Copy)]
pub struct Word {
    bytes: [u8; Word::CAP],
    len: u8,
}

impl Word {
    pub const CAP: usize = 16;

    /// `s` padded with `sep`, which [`PageWriter::word_sep`] emits after it.
    fn new(s: &str, sep: u8) -> Self {
        assert!(s.len() < Self::CAP, "vocabulary entry too long: {s:?}");
        let mut bytes = [sep; Self::CAP];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Self {
            bytes,
            len: s.len() as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The word lists, split once.
#[derive(Debug)]
pub struct Vocab {
    pub words: Vec<Word>,
    idents: Vec<Word>,
    first_names: Vec<Word>,
    last_names: Vec<Word>,
    streets: Vec<Word>,
    cities: Vec<(Word, Word)>,
    titles: Vec<Word>,
}

/// The shared vocabulary.
pub fn vocab() -> &'static Vocab {
    static VOCAB: OnceLock<Vocab> = OnceLock::new();
    VOCAB.get_or_init(|| {
        let split = |s: &str| {
            s.split_whitespace()
                .map(|w| Word::new(w, b' '))
                .collect::<Vec<_>>()
        };
        Vocab {
            words: split(WORDS),
            idents: IDENT
                .split_whitespace()
                .map(|w| Word::new(w, b'_'))
                .collect(),
            first_names: split(FIRST_NAMES),
            last_names: split(LAST_NAMES),
            streets: split(STREETS),
            cities: CITIES
                .split_whitespace()
                .map(|c| {
                    let (city, state) = c.split_once('|').expect("city|state");
                    (Word::new(city, b'|'), Word::new(state, b'|'))
                })
                .collect(),
            titles: split(TITLE_WORDS),
        }
    })
}

const JAVA_CLASSES: usize = 24;

/// One sentence of prose: capitalised, 5–18 skewed words, an occasional comma.
fn sentence(w: &mut PageWriter<'_>, rng: &mut Rng, v: &Vocab) {
    let n = rng.range(5, 18);
    let start = w.pos();
    for i in 0..n {
        let word = rng.pick_skewed(&v.words);
        if i + 1 == n {
            w.word(&word);
            w.str(". ");
        } else if rng.chance(60) {
            w.word(&word);
            w.str(", ");
        } else {
            w.word_sep(&word);
        }
    }
    w.upcase(start);
}

/// Documentation-like prose: wrapped paragraphs.
pub fn text_page(buf: &mut [u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut w = PageWriter::new(buf);
    let v = vocab();
    while !w.full() {
        for _ in 0..rng.range(2, 6) {
            sentence(&mut w, &mut rng, v);
            if rng.chance(300) {
                w.byte(b'\n');
            }
        }
        w.str("\n\n");
    }
}

/// An identifier of `min..=max` underscore-joined pieces.
fn ident(w: &mut PageWriter<'_>, rng: &mut Rng, min: usize, max: usize) {
    let idents = &vocab().idents;
    for _ in 1..rng.range(min, max) {
        w.word_sep(&rng.pick_skewed(idents));
    }
    w.word(&rng.pick_skewed(idents));
}

fn small_number(w: &mut PageWriter<'_>, rng: &mut Rng) {
    match rng.below(4) {
        0 => w.num(rng.below(16) as u64),
        1 => w.num(1 << rng.below(16)),
        2 => {
            w.str("0x");
            let v = (rng.below(256) as u64) << (4 * rng.below(4));
            let mut hex = [0u8; 16];
            let mut i = hex.len();
            let mut x = v;
            loop {
                i -= 1;
                hex[i] = b"0123456789abcdef"[(x & 15) as usize];
                x >>= 4;
                if x == 0 {
                    break;
                }
            }
            w.put(&hex[i..]);
        }
        _ => w.num(rng.below(1000) as u64),
    }
}

fn c_statement(w: &mut PageWriter<'_>, rng: &mut Rng, indent: usize) {
    for _ in 0..indent {
        w.byte(b'\t');
    }
    match rng.below(9) {
        0 => {
            w.str("if (");
            ident(w, rng, 1, 1);
            w.str("->");
            ident(w, rng, 1, 1);
            w.str(rng.pick(&[" < ", " > ", " == ", " != ", " & "]));
            small_number(w, rng);
            w.str(") {\n");
            c_statement(w, rng, indent + 1);
            for _ in 0..indent {
                w.byte(b'\t');
            }
            w.str("}\n");
        }
        1 => {
            w.str("ret = ");
            ident(w, rng, 2, 3);
            w.byte(b'(');
            ident(w, rng, 1, 1);
            w.str(", ");
            small_number(w, rng);
            w.str(");\n");
        }
        2 => {
            w.str("if (ret)\n");
            for _ in 0..=indent {
                w.byte(b'\t');
            }
            w.str("goto err_");
            ident(w, rng, 1, 1);
            w.str(";\n");
        }
        3 => {
            w.str("return -");
            w.str(rng.pick(ERRNOS));
            w.str(";\n");
        }
        4 => {
            w.str("/* ");
            let words = &vocab().words;
            for _ in 0..rng.range(3, 9) {
                w.word_sep(&rng.pick_skewed(words));
            }
            w.str("*/\n");
        }
        5 => {
            w.str("for (i = 0; i < ");
            ident(w, rng, 1, 1);
            w.str("->");
            ident(w, rng, 2, 2);
            w.str("; i++)\n");
            c_statement(w, rng, indent + 1);
        }
        6 => {
            w.str(rng.pick(&[
                "spin_lock(&",
                "mutex_lock(&",
                "spin_unlock(&",
                "mutex_unlock(&",
            ]));
            ident(w, rng, 1, 1);
            w.str("->lock);\n");
        }
        7 => {
            ident(w, rng, 1, 1);
            w.str("->");
            ident(w, rng, 1, 2);
            w.str(" = ");
            small_number(w, rng);
            w.str(";\n");
        }
        _ => {
            w.str("pr_debug(\"");
            ident(w, rng, 2, 2);
            w.str(": ");
            let words = &vocab().words;
            w.word_sep(&rng.pick_skewed(words));
            w.word(&rng.pick_skewed(words));
            w.str(" %d\\n\", ret);\n");
        }
    }
}

fn c_function(w: &mut PageWriter<'_>, rng: &mut Rng) {
    if rng.chance(700) {
        w.str("static ");
    }
    w.str(rng.pick(TYPES));
    w.byte(b' ');
    ident(w, rng, 2, 4);
    w.str("(struct ");
    w.str(rng.pick(STRUCTS));
    w.str(" *");
    ident(w, rng, 1, 1);
    if rng.chance(600) {
        w.str(", ");
        w.str(rng.pick(TYPES));
        w.byte(b' ');
        ident(w, rng, 1, 1);
    }
    w.str(")\n{\n\tint ret = 0;\n\n");
    for _ in 0..rng.range(3, 12) {
        c_statement(w, rng, 1);
    }
    w.str("\treturn ret;\n}\n\n");
}

/// C source: page 0 of a file carries the licence boilerplate and includes.
pub fn c_source_page(buf: &mut [u8], seed: u64, page_in_file: usize) {
    let mut rng = Rng::new(seed);
    let mut w = PageWriter::new(buf);
    if page_in_file == 0 {
        w.str(LICENSE);
        for _ in 0..rng.range(3, 9) {
            w.str("#include <");
            w.str(rng.pick(INCLUDES));
            w.str(">\n");
        }
        w.byte(b'\n');
    }
    while !w.full() {
        c_function(&mut w, &mut rng);
    }
}

/// A C header: include guard, struct definitions, prototypes.
pub fn c_header_page(buf: &mut [u8], seed: u64, page_in_file: usize) {
    let mut rng = Rng::new(seed);
    let mut w = PageWriter::new(buf);
    if page_in_file == 0 {
        w.str("/* SPDX-License-Identifier: GPL-2.0 */\n#ifndef _LINUX_");
        ident(&mut w, &mut rng, 2, 2);
        w.str("_H\n#define _LINUX_");
        ident(&mut w, &mut rng, 2, 2);
        w.str("_H\n\n");
    }
    while !w.full() {
        w.str("struct ");
        ident(&mut w, &mut rng, 2, 2);
        w.str(" {\n");
        for _ in 0..rng.range(3, 10) {
            w.byte(b'\t');
            w.str(rng.pick(TYPES));
            w.byte(b'\t');
            ident(&mut w, &mut rng, 1, 2);
            w.str(";\n");
        }
        w.str("};\n\n");
        for _ in 0..rng.range(1, 4) {
            w.str("int ");
            ident(&mut w, &mut rng, 3, 3);
            w.str("(struct ");
            w.str(rng.pick(STRUCTS));
            w.str(" *");
            ident(&mut w, &mut rng, 1, 1);
            w.str(");\n");
        }
        w.byte(b'\n');
    }
}

/// An object file: an ELF header on page 0, then x86-64-like code (a few instruction
/// templates with small immediates, the way compiled code repeats its idioms) and a
/// string table of symbol names.
pub fn object_page(buf: &mut [u8], seed: u64, page_in_file: usize) {
    let mut rng = Rng::new(seed);
    let mut w = PageWriter::new(buf);
    if page_in_file == 0 {
        w.put(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        w.put(&[1, 0, 0x3e, 0, 1, 0, 0, 0]);
        w.put(&[0u8; 40]);
    }
    let strtab = rng.chance(250);
    while !w.full() {
        if strtab {
            w.byte(0);
            w.str(rng.pick(&["", "", "__", "."]));
            ident(&mut w, &mut rng, 1, 4);
            continue;
        }
        match rng.below(10) {
            // push %rbp; mov %rsp,%rbp; push callee-saved
            0 => w.put(&[0x55, 0x48, 0x89, 0xe5, 0x41, 0x54, 0x53]),
            // mov disp8(%rdi),%eax
            1 => w.put(&[0x8b, 0x47, (rng.below(16) * 8) as u8]),
            // mov %eax,disp8(%rbx)
            2 => w.put(&[0x89, 0x43, (rng.below(16) * 8) as u8]),
            // call rel32 (relocated later: zero displacement, like a real .o)
            3 => w.put(&[0xe8, 0, 0, 0, 0]),
            // cmp $imm8,%eax; jcc rel8
            4 => w.put(&[
                0x83,
                0xf8,
                rng.below(32) as u8,
                0x74 + rng.below(4) as u8,
                rng.below(64) as u8,
            ]),
            // mov $imm32,%esi
            5 => {
                let v = (rng.below(4096) as u32).to_le_bytes();
                w.put(&[0xbe, v[0], v[1], v[2], v[3]]);
            }
            // xor %eax,%eax; pop; pop; pop %rbp; ret; nop padding
            6 => w.put(&[
                0x31, 0xc0, 0x5b, 0x41, 0x5c, 0x5d, 0xc3, 0x0f, 0x1f, 0x44, 0x00, 0x00,
            ]),
            // lea disp32(%rip),%rdi (relocated: zero)
            7 => w.put(&[0x48, 0x8d, 0x3d, 0, 0, 0, 0]),
            // test %eax,%eax; jne rel32
            8 => {
                let d = (rng.below(1024) as u32).to_le_bytes();
                w.put(&[0x85, 0xc0, 0x0f, 0x85, d[0], d[1], d[2], d[3]]);
            }
            _ => w.put(&[0x48, 0x89, 0xc7 + rng.below(8) as u8]),
        }
    }
}

/// Bytes per web-db row; a 4 KiB page holds 16 rows, like a slotted database page.
pub const ROW_BYTES: usize = 256;
/// The mutable columns sit at the row's head so an update rewrites only `ROW_HOT_BYTES`.
pub const ROW_HOT_BYTES: usize = 48;

/// The hot columns of a row, `|ts|status|qty|price|`: fixed width, bytes 10..48 (after
/// the 10-digit id, which never changes).
fn row_hot(w: &mut PageWriter<'_>, rng: &mut Rng, time_s: u64) {
    // 10-digit id already written; this covers bytes 10..48.
    w.byte(b'|');
    let ts = 1_700_000_000 + time_s;
    w.num(ts);
    w.byte(b'|');
    let status = rng.pick(ORDER_STATES);
    w.str(status);
    for _ in status.len()..12 {
        w.byte(b' ');
    }
    w.byte(b'|');
    let qty = rng.range(1, 20) as u64;
    if qty < 10 {
        w.byte(b'0');
    }
    w.num(qty);
    w.byte(b'|');
    // Prices like 12.99: few distinct cents values, the way real price lists look.
    let dollars = rng.range(1, 199) as u64;
    let cents = rng.pick(&[0u64, 49, 95, 99, 99, 99]);
    for _ in format_len(dollars)..6 {
        w.byte(b' ');
    }
    w.num(dollars);
    w.byte(b'.');
    if cents < 10 {
        w.byte(b'0');
    }
    w.num(cents);
    w.byte(b'|');
}

fn format_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// One TPC-W-like order row (customer, address, item) of exactly [`ROW_BYTES`].
pub fn db_row(row: &mut [u8], seed: u64, id: u64) {
    debug_assert_eq!(row.len(), ROW_BYTES);
    let mut rng = Rng::fork(seed, id);
    let mut w = PageWriter::new(row);
    let mut idbuf = [b'0'; 10];
    let mut x = id;
    for slot in idbuf.iter_mut().rev() {
        *slot = b'0' + (x % 10) as u8;
        x /= 10;
    }
    w.put(&idbuf);
    row_hot(&mut w, &mut rng, (id % 86_400) * 37 % 31_536_000);
    debug_assert_eq!(w.pos, ROW_HOT_BYTES);
    let v = vocab();
    let first = rng.pick_skewed(&v.first_names);
    let last = rng.pick_skewed(&v.last_names);
    w.word_sep(&first);
    w.word(&last);
    w.byte(b'|');
    for &b in first.as_bytes() {
        w.byte(b.to_ascii_lowercase());
    }
    w.byte(b'.');
    for &b in last.as_bytes() {
        w.byte(b.to_ascii_lowercase());
    }
    w.byte(b'@');
    w.str(rng.pick(EMAIL_DOMAINS));
    w.byte(b'|');
    w.num(rng.range(1, 9999) as u64);
    w.byte(b' ');
    w.word_sep(&rng.pick_skewed(&v.streets));
    w.str(rng.pick(STREET_KINDS));
    w.byte(b'|');
    let (city, state) = rng.pick_skewed(&v.cities);
    w.word_sep(&city);
    w.word_sep(&state);
    w.num(10_000 + rng.below(89_999) as u64);
    w.byte(b'|');
    for _ in 1..rng.range(2, 5) {
        w.word_sep(&rng.pick_skewed(&v.titles));
    }
    w.word(&rng.pick_skewed(&v.titles));
    w.byte(b'|');
    w.str("ISBN ");
    w.num(9_780_000_000_000 + rng.below(9_999_999) as u64 * 1000);
    w.str("|555-");
    w.num(100 + rng.below(900) as u64);
    w.byte(b'-');
    w.num(1000 + rng.below(9000) as u64);
    w.byte(b'|');
    // TPC-W fills many columns with random "a-strings"; one short one per row.
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    for _ in 0..rng.range(12, 20) {
        w.byte(rng.pick(ALNUM));
    }
    w.byte(b'|');
    // A free-text comment up to the row end, then space padding.
    while w.remaining() > 16 {
        w.word_sep(&rng.pick_skewed(&v.words));
    }
    let rest = w.remaining();
    if rest > 0 {
        // Space padding to the fixed row width, newline-terminated.
        let mut pad = [b' '; ROW_BYTES];
        pad[rest - 1] = b'\n';
        w.put(&pad[..rest]);
    }
}

/// Rewrites a row's hot columns as an order update at `time_s` would (a small in-page
/// delta, which is what page-delta compression in migration gets to exploit).
pub fn db_row_update(row: &mut [u8], seed: u64, version: u64, time_s: u64) {
    let mut rng = Rng::fork(seed, version);
    let mut w = PageWriter::new(&mut row[10..ROW_HOT_BYTES]);
    row_hot(&mut w, &mut rng, time_s);
}

/// A page of young-generation Java objects: 12-byte headers (mark word, compressed class
/// pointer), int fields, compressed references, and Latin-1 strings as UTF-16 char
/// arrays (half zero bytes), as SPECjbb's orders and customers look in a heap dump.
pub fn java_objects_page(buf: &mut [u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut w = PageWriter::new(buf);
    let heap_base: u32 = 0x8000_0000;
    while !w.full() {
        let klass = rng.skewed(JAVA_CLASSES) as u32;
        w.put(&1u64.to_le_bytes()); // unlocked, no hash: the common mark word
        w.put(&(0x0008_0000 + klass * 0x1c8).to_le_bytes());
        if klass % 4 == 0 {
            // char[]: length then UTF-16 code units of a word or two.
            let word = rng.pick_skewed(&vocab().words);
            let word = word.as_bytes();
            w.put(&(word.len() as u32).to_le_bytes());
            for &c in word {
                w.put(&[c, 0]);
            }
            // 8-byte object alignment padding.
            for _ in 0..(8 - (word.len() * 2 + 4) % 8) % 8 {
                w.byte(0);
            }
        } else {
            for _ in 0..(2 + klass % 5) {
                match rng.below(3) {
                    0 => w.put(&(rng.skewed(1000) as u32).to_le_bytes()),
                    1 => w.put(&(heap_base + (rng.below(1 << 20) as u32) * 8).to_le_bytes()),
                    _ => w.put(&0u32.to_le_bytes()),
                }
            }
            w.put(&0u32.to_le_bytes());
        }
    }
}

/// Long-lived objects in the old generation: like [`java_objects_page`] but with more
/// strings and references into the old generation itself.
pub fn java_old_page(buf: &mut [u8], seed: u64) {
    java_objects_page(buf, seed ^ 0x6f6c_6467_656e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_fixed_width_and_update_touches_only_hot_columns() {
        let mut row = [0u8; ROW_BYTES];
        db_row(&mut row, 9, 1234);
        assert_eq!(&row[..10], b"0000001234");
        assert_eq!(row[ROW_BYTES - 1], b'\n');
        assert!(
            row.iter().all(|b| b.is_ascii()),
            "{}",
            String::from_utf8_lossy(&row)
        );
        let before = row;
        db_row_update(&mut row, 9, 1, 500);
        assert_eq!(&row[ROW_HOT_BYTES..], &before[ROW_HOT_BYTES..]);
        assert_eq!(&row[..10], &before[..10]);
        assert_ne!(&row[10..ROW_HOT_BYTES], &before[10..ROW_HOT_BYTES]);
        let s = String::from_utf8_lossy(&row[..ROW_HOT_BYTES]);
        assert!(s.starts_with("0000001234|17000005"), "{s}");
    }

    #[test]
    fn generators_fill_every_byte() {
        // Any stale byte would make page content depend on history, not (generator, seed).
        type Gen = fn(&mut [u8], u64);
        let gens: [(&str, Gen); 6] = [
            ("text", text_page),
            ("c", |b, s| c_source_page(b, s, 0)),
            ("h", |b, s| c_header_page(b, s, 0)),
            ("o", |b, s| object_page(b, s, 0)),
            ("java", java_objects_page),
            ("old", java_old_page),
        ];
        for (name, g) in gens {
            let mut a = vec![0xAAu8; 4096];
            let mut b = vec![0x55u8; 4096];
            g(&mut a, 3);
            g(&mut b, 3);
            assert_eq!(a, b, "{name}");
        }
    }

    #[test]
    fn c_source_looks_like_c() {
        let mut page = vec![0u8; 4096];
        c_source_page(&mut page, 1, 0);
        let s = String::from_utf8(page).unwrap();
        assert!(s.starts_with("// SPDX-License-Identifier"));
        assert!(s.contains("#include <linux/"));
        assert!(s.contains("\treturn ret;\n}\n"));
    }
}
