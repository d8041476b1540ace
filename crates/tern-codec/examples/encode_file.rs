//! Encodes a captured QEMU migration stream (e.g. `migrate exec:cat > FILE`) with each
//! option set, decodes it again, and prints sizes and CPU throughput of both ends:
//!
//!     cargo run --release -p tern-codec --example encode_file -- FILE [OPTIONS...]
//!
//! OPTIONS are `--codec` spellings (default: none re delta zstd all). The store starts empty.
//! `TERN_ZSTD_LEVEL=N` sets the residual zstd level.

use std::time::Instant;

use tern_codec::{Decoder, Encoder, MemStore, Options};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: encode_file FILE [OPTIONS...]");
        std::process::exit(2);
    };
    let data = std::fs::read(&path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1);
    });
    let mut sets: Vec<String> = args.collect();
    if sets.is_empty() {
        sets = ["none", "re", "delta", "zstd", "all"]
            .map(String::from)
            .to_vec();
    }
    println!("{path}: {:.1} MB", data.len() as f64 / 1e6);
    for s in sets {
        let opts = Options::parse(&s).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2);
        });
        let (mut a, mut b) = (MemStore::default(), MemStore::default());
        let t = Instant::now();
        let level = std::env::var("TERN_ZSTD_LEVEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(tern_codec::residual::DEFAULT_LEVEL);
        let mut enc = Encoder::new(opts).with_zstd_level(level);
        let mut out = Vec::with_capacity(data.len() / 2);
        for chunk in data.chunks(64 << 10) {
            enc.push(chunk, &mut out, &mut a);
        }
        enc.finish(&mut out);
        let te = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut dec = Decoder::new(opts);
        let mut back = Vec::with_capacity(data.len());
        for chunk in out.chunks(64 << 10) {
            dec.push(chunk, &mut back, &mut b).expect("decodes");
        }
        let td = t.elapsed().as_secs_f64();
        assert!(back == data, "round trip differs");
        let st = enc.stats();
        println!(
            "{s:>12}: {:7.1} MB ({:5.1}%)  encode {:6.0} MB/s  decode {:6.0} MB/s  re {} delta {} zero-sub {}",
            out.len() as f64 / 1e6,
            out.len() as f64 * 100.0 / data.len() as f64,
            data.len() as f64 / 1e6 / te,
            data.len() as f64 / 1e6 / td,
            st.re_hits,
            st.delta_pages,
            st.zero_subblocks
        );
    }
}
