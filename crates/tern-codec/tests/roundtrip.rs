//! Round trips of real QEMU 7.2 streams (tests/golden) and of generated ones through the
//! encoder and decoder, with every option set and arbitrary chunking, and robustness of the
//! decoder against damaged input.

use tern_codec::store::{ContentStore, MemStore, NoStore, page_key};
use tern_codec::{Decoder, Encoder, Options, PAGE, Summary};

fn golden(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/golden/{name}.qemu.zst",
        env!("CARGO_MANIFEST_DIR")
    );
    let z = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    zstd::decode_all(&z[..]).expect("zstd")
}

const GOLDEN: [&str; 4] = ["idle", "iterate", "xbzrle", "compress"];

fn all_options() -> Vec<Options> {
    (0..16).map(|b| Options::from_byte(b).unwrap()).collect()
}

/// Small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Encodes `stream` in chunks from `rng`, decodes the result in other chunks; returns the
/// encoded bytes and checks the decoded bytes equal the input.
fn round_trip(
    stream: &[u8],
    opts: Options,
    rng: &mut Rng,
    src: &mut dyn ContentStore,
    dst: &mut dyn ContentStore,
    summary: Option<Summary>,
) -> (Vec<u8>, tern_codec::Stats) {
    let mut enc = Encoder::with_capacity(opts, 4096, 8192);
    if let Some(s) = summary {
        enc.set_summary(s);
    }
    let mut encoded = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = (1 + rng.below(70_000) as usize).min(stream.len() - pos);
        enc.push(&stream[pos..pos + n], &mut encoded, src);
        pos += n;
    }
    enc.finish(&mut encoded);
    let mut dec = Decoder::with_capacity(opts, 4096, 8192);
    let mut decoded = Vec::new();
    let mut pos = 0;
    while pos < encoded.len() {
        let n = (1 + rng.below(50_000) as usize).min(encoded.len() - pos);
        dec.push(&encoded[pos..pos + n], &mut decoded, dst)
            .expect("decodes");
        pos += n;
    }
    assert!(dec.is_clean());
    assert!(decoded == stream, "decoded stream differs ({opts})");
    let st = enc.stats().clone();
    assert_eq!(st.input_bytes, stream.len() as u64);
    assert_eq!(st.output_bytes, encoded.len() as u64);
    (encoded, st)
}

#[test]
fn golden_streams_round_trip_with_every_option_set() {
    let mut rng = Rng(0x1234_5678);
    for name in GOLDEN {
        let s = golden(name);
        for opts in all_options() {
            let (enc, st) = round_trip(
                &s,
                opts,
                &mut rng,
                &mut MemStore::default(),
                &mut MemStore::default(),
                Some(Summary::default()),
            );
            assert_eq!(st.fallback, None, "{name} {opts}: parsed to the end of RAM");
            assert!(st.pages > 0, "{name}: pages found");
            assert!(
                enc.len() <= s.len() + s.len() / 100,
                "{name} {opts}: {} > {}",
                enc.len(),
                s.len()
            );
        }
    }
}

#[test]
fn golden_iterate_stream_shrinks_with_deltas_and_re() {
    let s = golden("iterate");
    let mut rng = Rng(7);
    let (plain, _) = round_trip(
        &s,
        Options::NONE,
        &mut rng,
        &mut NoStore,
        &mut NoStore,
        None,
    );
    let (delta, st) = round_trip(
        &s,
        Options {
            delta: true,
            ..Options::NONE
        },
        &mut rng,
        &mut NoStore,
        &mut NoStore,
        None,
    );
    assert!(st.delta_pages >= 128, "re-sent pages go as deltas: {st:?}");
    assert!(
        delta.len() < plain.len() * 9 / 10,
        "{} vs {}",
        delta.len(),
        plain.len()
    );
    let (_, st) = round_trip(
        &s,
        Options {
            re: true,
            ..Options::NONE
        },
        &mut rng,
        &mut NoStore,
        &mut NoStore,
        None,
    );
    assert!(st.re_hits > 0, "{st:?}");
}

#[test]
fn store_references_need_the_summary_and_round_trip() {
    let s = golden("iterate");
    let mut rng = Rng(99);
    let store_only = Options {
        store: true,
        ..Options::NONE
    };
    // First migration fills both stores.
    let mut a = MemStore::default();
    let mut b = MemStore::default();
    let sb = b.summary();
    let (first, st1) = round_trip(&s, store_only, &mut rng, &mut a, &mut b, Some(sb));
    assert_eq!(st1.store_hits, 0);
    // Coming back: B is the sender, A's summary says it holds every page.
    let sa = a.summary();
    let (second, st2) = round_trip(&s, store_only, &mut rng, &mut b, &mut a, Some(sa));
    assert!(st2.store_hits == st2.pages, "{st2:?}");
    assert!(
        second.len() < first.len() / 2,
        "{} vs {}",
        second.len(),
        first.len()
    );
    // Without a summary nothing is referenced.
    let (_, st3) = round_trip(&s, store_only, &mut rng, &mut b, &mut a, None);
    assert_eq!(st3.store_hits, 0);
}

#[test]
fn store_miss_is_an_error_not_wrong_memory() {
    let s = golden("idle");
    let mut a = MemStore::default();
    let mut enc = Encoder::new(Options::ALL);
    // Claim the destination holds everything the source has.
    let mut full = MemStore::default();
    let mut out = Vec::new();
    Encoder::new(Options::ALL).push(&s, &mut out, &mut full);
    enc.set_summary(full.summary());
    let mut encoded = Vec::new();
    enc.push(&s, &mut encoded, &mut a);
    enc.finish(&mut encoded);
    assert!(enc.stats().store_hits > 0);
    let mut dec = Decoder::new(Options::ALL);
    let err = dec
        .push(&encoded, &mut Vec::new(), &mut MemStore::default())
        .unwrap_err();
    assert!(
        matches!(err, tern_codec::DecodeError::StoreMiss { .. }),
        "{err}"
    );
}

/// A generated stream: `passes` passes over `n` pages whose contents change a little per
/// pass, with repeated sub-blocks across pages, zero sub-blocks and zero pages.
fn generated(rng: &mut Rng, n: u64, passes: usize) -> Vec<u8> {
    let mut s = golden("idle");
    // Cut at the END section's first record: reuse header + START from the real stream, then
    // our PART sections, then the real stream's tail from its END section on.
    let start_end = find_part(&s, 0);
    let tail = s.split_off(start_end);
    let mut pages: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut p = vec![0u8; PAGE];
            for (j, b) in p.iter_mut().enumerate() {
                *b = ((i as usize * 31 + j / 8) % 251) as u8;
            }
            if i % 5 == 0 {
                p[1024..2048].fill(0);
            }
            if i % 7 == 0 {
                p[..1024].fill(0xab);
            }
            p
        })
        .collect();
    for _ in 0..passes {
        s.push(0x02);
        s.extend_from_slice(&2u32.to_be_bytes()); // the ram section id of the golden streams
        let mut first = true;
        for (i, p) in pages.iter_mut().enumerate() {
            if rng.below(3) == 0 {
                continue;
            }
            for _ in 0..rng.below(20) {
                let at = rng.below(PAGE as u64) as usize;
                p[at] = rng.next() as u8;
            }
            let addr = 0x80_0000 + i as u64 * 4096;
            let zero = i % 11 == 3;
            let flags: u64 = if zero { 0x02 } else { 0x08 } | if first { 0 } else { 0x20 };
            s.extend_from_slice(&(addr | flags).to_be_bytes());
            if first {
                s.push(6);
                s.extend_from_slice(b"pc.ram");
                first = false;
            }
            if zero {
                s.push(0);
            } else {
                s.extend_from_slice(p);
            }
        }
        s.extend_from_slice(&0x10u64.to_be_bytes());
        s.push(0x7e);
        s.extend_from_slice(&2u32.to_be_bytes());
    }
    s.extend_from_slice(&tail);
    s
}

/// Offset of the first PART/END section of the golden idle stream after `from`.
fn find_part(s: &[u8], from: usize) -> usize {
    // The START section ends with EOS + footer (0x7e, section 2); the next byte is PART/END.
    let pat = [0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2];
    from + s[from..]
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("START footer")
        + pat.len()
}

#[test]
fn generated_streams_round_trip_property() {
    let mut rng = Rng(0xdead_beef);
    for case in 0..12 {
        let stream = generated(&mut rng, 40 + case * 10, 1 + case as usize % 4);
        for opts in all_options() {
            let mut a = MemStore::default();
            let mut b = MemStore::default();
            let sum = if case % 2 == 0 {
                Some(b.summary())
            } else {
                None
            };
            let (_, st) = round_trip(&stream, opts, &mut rng, &mut a, &mut b, sum);
            assert_eq!(st.fallback, None, "case {case} {opts}");
            if opts.re {
                assert!(
                    st.re_hits > 0 || st.delta_pages > 0,
                    "case {case} {opts}: {st:?}"
                );
            }
        }
    }
}

#[test]
fn unparseable_input_passes_through() {
    let mut rng = Rng(5);
    for len in [0usize, 1, 7, 8, 100, 10_000] {
        let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let (_, st) = round_trip(
            &junk,
            Options::ALL,
            &mut rng,
            &mut NoStore,
            &mut NoStore,
            None,
        );
        if len >= 8 {
            assert!(st.fallback.is_some());
        }
    }
    // A real stream cut short still round-trips (the tail goes raw at finish).
    let s = golden("iterate");
    for cut in [9, 1000, 500_000, s.len() - 3] {
        round_trip(
            &s[..cut],
            Options::ALL,
            &mut rng,
            &mut NoStore,
            &mut NoStore,
            None,
        );
    }
}

#[test]
fn damaged_encoded_streams_never_panic() {
    // Fuzz-style: flip, drop and insert bytes in real encoded streams; the decoder must
    // return Ok or Err, never panic, and never hang.
    let mut rng = Rng(0xfeed);
    let s = golden("iterate");
    let frames_only = Options {
        zstd: false,
        ..Options::ALL
    };
    for opts in [Options::ALL, frames_only] {
        let mut enc = Encoder::new(opts);
        let mut encoded = Vec::new();
        enc.push(&s, &mut encoded, &mut MemStore::default());
        enc.finish(&mut encoded);
        for _ in 0..300 {
            let mut e = encoded.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(e.len() as u64) as usize;
                match rng.below(3) {
                    0 => e[at] ^= 1 << rng.below(8),
                    1 => {
                        e.remove(at);
                    }
                    _ => e.insert(at, rng.next() as u8),
                }
            }
            let mut dec = Decoder::new(opts);
            let mut out = Vec::new();
            let _ = dec.push(&e, &mut out, &mut MemStore::default());
        }
        for _ in 0..300 {
            let len = rng.below(3000) as usize;
            let junk: Vec<u8> = (0..len).map(|_| (rng.next() % 6) as u8).collect();
            let _ = Decoder::new(opts).push(&junk, &mut Vec::new(), &mut MemStore::default());
        }
    }
}

#[test]
fn page_keys_are_content_hashes() {
    assert_eq!(page_key(&[0; PAGE]), page_key(&[0; PAGE]));
    assert_ne!(page_key(&[0; PAGE]), page_key(&[1; PAGE]));
}

#[test]
fn a_wrong_page_is_a_check_error() {
    // One flipped byte inside a literal page (no zstd, so the byte lands in the page).
    let s = golden("idle");
    let opts = Options::NONE;
    let mut enc = Encoder::new(opts);
    let mut e = Vec::new();
    enc.push(&s, &mut e, &mut NoStore);
    enc.finish(&mut e);
    // The first PAGE record's data, found with the parser.
    let mut parser = tern_codec::qemu::Parser::new();
    let mut pos = 0;
    let page_at = loop {
        match parser.next(&s[pos..]).expect("complete stream") {
            tern_codec::qemu::Item::Verbatim(n) | tern_codec::qemu::Item::Zero { len: n } => {
                pos += n
            }
            tern_codec::qemu::Item::Page { header, .. } => break pos + header,
            other => panic!("no page before {other:?}"),
        }
    };
    let needle = &s[page_at..page_at + 64];
    let at = e
        .windows(64)
        .position(|w| w == needle)
        .expect("literal page bytes in the frames");
    e[at + 100] ^= 0x40;
    let err = Decoder::new(opts)
        .push(&e, &mut Vec::new(), &mut NoStore)
        .unwrap_err();
    assert!(
        matches!(err, tern_codec::DecodeError::Check { .. }),
        "{err}"
    );
}
