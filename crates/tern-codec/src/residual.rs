//! Residual compression: one zstd stream over the encoded frames of a whole migration,
//! flushed after every push so the destination can decode all bytes sent so far.
//!
//! A single stream keeps its window (8 MiB) across pushes; compressing each 64 KiB record
//! on its own (the transport's adaptive compression) loses the matches between records.
//! Measured on a 256 MiB web-db guest's stream (253 MB): zstd-1 per stream 89.5 MB,
//! zstd-3 83.8 MB, against about 112 MB for the transport's per-record zstd-1.

use std::io;

use zstd::stream::raw::{CParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Default level. Measured on a 256 MiB web-db guest's stream (`examples/encode_file`, idle
/// machine): level 1 89.0 MB at 178 MB/s, level 2 86.3 MB at 122 MB/s, level 3 83.8 MB at
/// 88 MB/s. On the 2-core lab the node shares its core with QEMU, and level 3 made whole
/// migrations CPU-bound (40-50 of 100 Mbit/s), so level 1.
pub const DEFAULT_LEVEL: i32 = 1;
const WINDOW_LOG: u32 = 23;
/// Most bytes [`Decompressor::push`] appends for one input (a flushed push of the
/// compressor holds one record or chunk, far less). Beyond it the push fails with
/// `InvalidData`: a small input that expands further is a decompression bomb.
pub const MAX_PUSH_OUT_BYTES: usize = 64 << 20;
const STEP: usize = 64 << 10;

pub struct Compressor {
    z: Encoder<'static>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    pub fn new(level: i32) -> io::Result<Compressor> {
        let mut z = Encoder::new(level)?;
        z.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
        Ok(Compressor { z })
    }

    /// Appends the compressed form of `input` to `out`, flushed.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut inb = InBuffer::around(input);
        while inb.pos() < input.len() {
            out.reserve(STEP);
            let at = out.len();
            let mut ob = OutBuffer::around_pos(out, at);
            self.z.run(&mut inb, &mut ob)?;
        }
        loop {
            out.reserve(STEP);
            let at = out.len();
            let mut ob = OutBuffer::around_pos(out, at);
            if self.z.flush(&mut ob)? == 0 {
                return Ok(());
            }
        }
    }
}

pub struct Decompressor {
    z: Decoder<'static>,
    /// The last call filled its output: zstd may still hold output for input it took.
    draining: bool,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub fn new() -> io::Result<Decompressor> {
        let mut z = Decoder::new()?;
        z.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG))?;
        Ok(Decompressor { z, draining: false })
    }

    /// Decompresses `input[*pos..]`, appending at most `max_out_bytes` to `out` (never
    /// allocating more than that) and advancing `*pos` past the input used. `Ok(true)` once
    /// all of `input` is used and everything it decompresses to is in `out`; `Ok(false)`
    /// when `max_out_bytes` were written and more may follow: call again.
    pub fn step(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
        max_out_bytes: usize,
    ) -> io::Result<bool> {
        let mut written = 0;
        loop {
            if *pos >= input.len() && !self.draining {
                // Everything is out. (zstd counts calls without progress and fails after a
                // few in a row, so none is made.)
                return Ok(true);
            }
            if written >= max_out_bytes {
                return Ok(false);
            }
            let room = (max_out_bytes - written).min(4 * STEP);
            let at = out.len();
            out.resize(at + room, 0);
            let mut inb = InBuffer::around(&input[*pos..]);
            let mut ob = OutBuffer::around(&mut out[at..]);
            let r = self.z.run(&mut inb, &mut ob);
            let (used, n) = (inb.pos(), ob.pos());
            out.truncate(at + n);
            r?;
            *pos += used;
            written += n;
            // A full output buffer: zstd may hold more for the input it already took.
            self.draining = n == room;
        }
    }

    /// Appends everything `input` decompresses to (so far) to `out`, failing rather than
    /// growing it by more than [`MAX_PUSH_OUT_BYTES`]. Callers that know the size the
    /// format declares use [`Decompressor::push_limited`] with it.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.push_limited(input, out, MAX_PUSH_OUT_BYTES)
    }

    /// Appends everything `input` decompresses to (so far) to `out`, failing (with `out`
    /// holding a prefix) rather than growing it by more than `max_out_bytes`; nothing beyond
    /// that is allocated.
    pub fn push_limited(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out_bytes: usize,
    ) -> io::Result<()> {
        let mut pos = 0;
        let start = out.len();
        // One byte beyond the limit tells "exactly the limit" from "more".
        let done = self.step(input, &mut pos, out, max_out_bytes.saturating_add(1))?;
        if done && out.len() - start <= max_out_bytes {
            return Ok(());
        }
        out.truncate(start + max_out_bytes);
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompresses to more than {max_out_bytes} bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_drain_output_held_after_the_input_is_used() {
        // 3 MiB that compress to a few KiB: zstd takes all input in the first step and
        // holds most of the output; later steps (with no input left) must still drain it.
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096) as u8).collect();
        let mut c = Compressor::new(1).unwrap();
        let mut z = Vec::new();
        c.push(&data, &mut z).unwrap();
        assert!(z.len() < 64 << 10);
        let mut d = Decompressor::new().unwrap();
        let (mut pos, mut out, mut steps) = (0, Vec::new(), 0);
        while !d.step(&z, &mut pos, &mut out, 100_000).unwrap() {
            steps += 1;
            assert!(out.len() <= steps * 100_000);
        }
        assert_eq!(pos, z.len());
        assert!(steps >= 31);
        assert!(out == data, "{} of {} bytes", out.len(), data.len());
        // Exactly at the cap is fine, one byte under is refused.
        let mut d = Decompressor::new().unwrap();
        d.push_limited(&z, &mut Vec::new(), data.len()).unwrap();
        let mut d = Decompressor::new().unwrap();
        assert!(d.push_limited(&z, &mut Vec::new(), data.len() - 1).is_err());
    }

    #[test]
    fn flushed_pushes_decode_in_any_split() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| ((i % 251) ^ (i / 1000)) as u8)
            .collect();
        let mut c = Compressor::new(3).unwrap();
        let mut z = Vec::new();
        let mut marks = Vec::new();
        for chunk in data.chunks(70_000) {
            c.push(chunk, &mut z).unwrap();
            marks.push(z.len());
        }
        assert!(z.len() < data.len() / 4);
        // Everything pushed is decodable from the bytes so far (flushed).
        let mut d = Decompressor::new().unwrap();
        let mut out = Vec::new();
        let mut prev = 0;
        for (i, &m) in marks.iter().enumerate() {
            for piece in z[prev..m].chunks(977) {
                d.push(piece, &mut out).unwrap();
            }
            prev = m;
            assert_eq!(out.len(), ((i + 1) * 70_000).min(data.len()));
        }
        assert_eq!(out, data);
        for _ in 0..100 {
            d.push_limited(&[], &mut out, 0).unwrap();
        }
        let mut d = Decompressor::new().unwrap();
        assert!(
            d.push(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &mut Vec::new())
                .is_err()
        );
    }
}
