//! A hand-rolled NBD client side for tests: message builders, expected-reply builders and
//! a harness that runs a `ServerSession` against a `MemBackend`.
#![allow(dead_code)]

use tern_nbd::wire::*;
use tern_nbd::{Event, ExportInfo, MemBackend, ServerSession, execute, nbd_error};

pub const SIZE: u64 = 1 << 20;

pub fn export(name: &str, size: u64, read_only: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: format!("{name} disk"),
        size,
        read_only,
        multi_conn: false,
    }
}

pub fn greeting() -> Vec<u8> {
    let mut v = NBD_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    v
}

pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Meta-context option data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

pub fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

pub fn write_request(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
    v.extend_from_slice(data);
    v
}

pub fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Option replies in `bytes`: (option, type, data).
pub fn parse_opt_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 20 {
        assert_eq!(
            u64::from_be_bytes(bytes[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        out.push((option, kind, bytes[20..20 + len].to_vec()));
        bytes = &bytes[20 + len..];
    }
    assert!(bytes.is_empty(), "trailing bytes {bytes:?}");
    out
}

/// Error code of a single structured error chunk.
pub fn chunk_error(bytes: &[u8]) -> u32 {
    assert_eq!(
        u32::from_be_bytes(bytes[0..4].try_into().unwrap()),
        STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(
        u16::from_be_bytes(bytes[6..8].try_into().unwrap()),
        REPLY_TYPE_ERROR
    );
    u32::from_be_bytes(bytes[20..24].try_into().unwrap())
}

/// Runs a session against a `MemBackend` the size of the first export.
pub struct Harness {
    pub session: ServerSession,
    pub backend: MemBackend,
    pub events: Vec<Event>,
    /// Answer requests automatically (else they are kept in `events`).
    pub auto_reply: bool,
}

impl Harness {
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let size = exports.first().map_or(0, |e| e.size) as usize;
        let read_only = exports.first().is_some_and(|e| e.read_only);
        let mut h = Harness {
            session: ServerSession::new(exports),
            backend: MemBackend::new(size, read_only),
            events: Vec::new(),
            auto_reply: true,
        };
        assert_eq!(h.session.take_output(), greeting());
        h
    }

    /// Default exports, client flags sent (NO_ZEROES).
    pub fn negotiating() -> Self {
        let mut h = Harness::new(vec![export("disk", SIZE, false), export("ro", SIZE, true)]);
        assert!(
            h.feed(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
                .is_empty()
        );
        h
    }

    /// In transmission on export "disk", with structured replies and base:allocation if
    /// `structured`.
    pub fn transmitting(structured: bool) -> Self {
        let mut h = Harness::negotiating();
        if structured {
            h.feed(&option(OPT_STRUCTURED_REPLY, &[]));
            h.feed(&option(
                OPT_SET_META_CONTEXT,
                &meta_data("disk", &["base:allocation"]),
            ));
        }
        h.feed(&option(OPT_GO, &info_data("disk", &[])));
        assert_eq!(h.events.pop(), Some(Event::ExportChosen(0)));
        h
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.session.input(bytes);
        self.drain()
    }

    pub fn drain(&mut self) -> Vec<u8> {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Request(request) if self.auto_reply => {
                    let result = execute(&self.backend, &request).map_err(|e| nbd_error(&e));
                    self.session.reply(request.id, result).unwrap();
                }
                other => self.events.push(other),
            }
        }
        self.session.take_output()
    }
}

/// xorshift64*: a seeded generator, so every run of a seed is the same.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// Fewer than `max` random bytes.
    pub fn bytes_below(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
