//! Whole-area properties of every profile: determinism per seed, compressibility like real
//! data (zstd), and some — not total — page-level redundancy.

use std::collections::HashMap;

use tern_guest::store::{BLOCK_BYTES, Store};
use tern_guest::workload::{Profile, Workload};

const BLOCKS: usize = 2048; // 8 MiB

fn area(p: Profile, seed: u64) -> Store {
    let w = Workload::new(p, BLOCKS, seed);
    let mut s = Store::new(BLOCKS);
    w.fill(&mut s);
    s
}

/// zstd level 3 over 1 MiB chunks (how a migration stream sees it) and over single pages.
fn ratios(data: &[u8]) -> (f64, f64) {
    let chunked: usize = data
        .chunks(1 << 20)
        .map(|c| zstd::bulk::compress(c, 3).unwrap().len())
        .sum();
    let paged: usize = data
        .chunks(BLOCK_BYTES)
        .map(|c| zstd::bulk::compress(c, 3).unwrap().len())
        .sum();
    (
        data.len() as f64 / chunked as f64,
        data.len() as f64 / paged as f64,
    )
}

fn distinct_pages(data: &[u8]) -> usize {
    let mut seen: HashMap<&[u8], ()> = HashMap::new();
    for p in data.chunks(BLOCK_BYTES) {
        seen.insert(p, ());
    }
    seen.len()
}

#[test]
fn content_is_deterministic_per_seed() {
    for p in Profile::ALL {
        let a = area(p, 11);
        let b = area(p, 11);
        let c = area(p, 12);
        assert!(
            a.as_bytes() == b.as_bytes(),
            "{} not deterministic",
            p.name()
        );
        assert!(
            a.as_bytes() != c.as_bytes(),
            "{} ignores the seed",
            p.name()
        );
    }
}

#[test]
fn writes_are_deterministic_per_seed() {
    for p in Profile::ALL {
        let run = |seed| {
            let mut w = Workload::new(p, BLOCKS, seed);
            let mut s = Store::new(BLOCKS);
            w.fill(&mut s);
            let touched: Vec<usize> = (0..500).map(|t| w.touch(&mut s, t / 50).unwrap()).collect();
            (touched, s.as_bytes().to_vec())
        };
        assert!(run(3) == run(3), "{}", p.name());
    }
}

#[test]
fn content_compresses_like_real_data() {
    for p in Profile::ALL {
        let s = area(p, 1);
        let w = Workload::new(p, BLOCKS, 1);
        // java-heap: measure the live objects; its free heap is zero on purpose.
        let live = match p {
            Profile::JavaHeap => &s.as_bytes()[..w.hot_range().end * BLOCK_BYTES],
            _ => s.as_bytes(),
        };
        let (chunked, paged) = ratios(live);
        let (whole, _) = ratios(s.as_bytes());
        println!(
            "{:15} zstd-3 ratio: 1 MiB chunks {chunked:.2}, 4 KiB pages {paged:.2}, whole area {whole:.2}",
            p.name()
        );
        assert!(
            (2.0..=4.5).contains(&chunked),
            "{}: chunk ratio {chunked:.2} outside 2..4.5",
            p.name()
        );
        assert!(paged >= 1.5, "{}: page ratio {paged:.2}", p.name());
        assert!(paged <= chunked, "{}", p.name());
    }
}

#[test]
fn pages_repeat_somewhat_but_not_wholesale() {
    for p in Profile::ALL {
        let s = area(p, 1);
        let distinct = distinct_pages(s.as_bytes());
        let dup = 1.0 - distinct as f64 / BLOCKS as f64;
        println!("{:15} duplicate pages {:.1}%", p.name(), dup * 100.0);
        let band = match p {
            // The page cache caches ~12% of files twice.
            Profile::Idle | Profile::KernelCompile => 0.03..0.30,
            // Every row has a unique id: no two table pages are equal.
            Profile::WebDb => 0.0..0.001,
            // The free heap is zero pages.
            Profile::JavaHeap => 0.50..0.70,
        };
        assert!(
            band.contains(&dup),
            "{}: {:.3} not in {band:?}",
            p.name(),
            dup
        );
    }
}
