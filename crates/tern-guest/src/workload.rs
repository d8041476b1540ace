//! The memory workloads (after CloudNet's evaluation applications) and the pacer that
//! spreads their page writes over time.
//!
//! A workload is sans-IO: [`Workload::fill_block`] says what a record holds initially and
//! [`Workload::touch`] makes one page-sized modification at a caller-given time. The
//! caller decides when (with [`Pacer`]), which lets tests run the workloads in virtual time.
//!
//! | profile | mimics | layout | writes |
//! |---|---|---|---|
//! | `idle` | an idle server | page cache of text/code files | none |
//! | `kernel-compile` | kernel build | page cache: `.c`, `.h`, docs, `.o` files, page aligned, ~12% of files duplicated | `.o` pages rewritten in sequence (70%), small edits anywhere (30%) |
//! | `web-db` | TPC-W | order table, 16 fixed 256-byte text rows per page | 1–3 rows' hot columns in a uniformly random page |
//! | `java-heap` | SPECjbb | old generation 25%, nursery 1/8, the rest zero | nursery pages rewritten in sequence; every 32nd write promotes into the old generation |

use crate::content;
use crate::rng::{Rng, mix};
use crate::store::{BLOCK_BYTES, Corruption, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Idle,
    KernelCompile,
    WebDb,
    JavaHeap,
}

impl Profile {
    pub const ALL: [Profile; 4] = [
        Profile::Idle,
        Profile::KernelCompile,
        Profile::WebDb,
        Profile::JavaHeap,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Idle => "idle",
            Profile::KernelCompile => "kernel-compile",
            Profile::WebDb => "web-db",
            Profile::JavaHeap => "java-heap",
        }
    }

    /// Pages touched per second, in MiB/s, when `--rate-mbps` is not given. Chosen so a
    /// TCG guest (one vCPU, a few hundred MB/s of memory bandwidth) keeps up with room to
    /// spare for the verifier and the TCP service.
    pub fn default_rate_mbps(self) -> f64 {
        match self {
            Profile::Idle => 0.0,
            Profile::KernelCompile => 4.0,
            Profile::WebDb => 8.0,
            Profile::JavaHeap => 16.0,
        }
    }

    /// Pause between the starts of two verification passes. An idle guest should mostly
    /// sleep, so it checks less often.
    pub fn default_verify_interval_ms(self) -> u64 {
        match self {
            Profile::Idle => 5_000,
            _ => 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Text,
    CSource,
    CHeader,
    Object,
}

/// A page-aligned file in the simulated page cache.
#[derive(Debug, Clone, Copy)]
struct FileExtent {
    start: usize,
    pages: usize,
    kind: FileKind,
    seed: u64,
}

#[derive(Debug)]
enum Layout {
    Files {
        files: Vec<FileExtent>,
        objects: Vec<usize>,
        /// Next object page to rewrite: (index into `objects`, page in file).
        cursor: (usize, usize),
    },
    Table,
    Heap {
        old_blocks: usize,
        nursery_blocks: usize,
        cursor: usize,
    },
}

/// Files duplicated from an earlier file, per mille (identical pages for deduplication).
const DUPLICATE_FILES_PER_MILLE: u32 = 120;
/// Rows per web-db page.
const ROWS_PER_BLOCK: usize = BLOCK_BYTES / content::ROW_BYTES;
/// One java-heap write in this many promotes objects into the old generation.
const PROMOTE_EVERY: u64 = 32;

/// One workload over a store of a fixed number of records.
#[derive(Debug)]
pub struct Workload {
    profile: Profile,
    seed: u64,
    blocks: usize,
    rng: Rng,
    /// Modifications made so far (also the version mixed into rewritten content).
    touches: u64,
    layout: Layout,
}

impl Workload {
    pub fn new(profile: Profile, blocks: usize, seed: u64) -> Self {
        assert!(blocks > 0, "a workload needs at least one record");
        let layout = match profile {
            Profile::Idle | Profile::KernelCompile => file_layout(blocks, seed),
            Profile::WebDb => Layout::Table,
            Profile::JavaHeap => {
                let old_blocks = (blocks / 4).max(1).min(blocks);
                let nursery_blocks = (blocks / 8).max(1).min(blocks - old_blocks);
                Layout::Heap {
                    old_blocks,
                    nursery_blocks,
                    cursor: 0,
                }
            }
        };
        Self {
            profile,
            seed,
            blocks,
            rng: Rng::fork(seed, 0x0074_6f75_6368),
            touches: 0,
            layout,
        }
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    pub fn touches(&self) -> u64 {
        self.touches
    }

    /// The records writes land in (for java-heap the nursery; every other profile can
    /// write anywhere). Old-generation promotions are outside this range.
    pub fn hot_range(&self) -> std::ops::Range<usize> {
        match &self.layout {
            Layout::Heap {
                old_blocks,
                nursery_blocks,
                ..
            } => *old_blocks..old_blocks + nursery_blocks,
            _ => 0..self.blocks,
        }
    }

    /// The initial content of record `i`.
    pub fn fill_block(&self, i: usize, buf: &mut [u8]) {
        match &self.layout {
            Layout::Files { files, .. } => {
                let f = &files[files.partition_point(|f| f.start <= i) - 1];
                file_page(f, i - f.start, f.seed, buf);
            }
            Layout::Table => {
                for (r, row) in buf.chunks_exact_mut(content::ROW_BYTES).enumerate() {
                    content::db_row(row, self.seed, (i * ROWS_PER_BLOCK + r + 1) as u64);
                }
            }
            Layout::Heap {
                old_blocks,
                nursery_blocks,
                ..
            } => {
                if i < *old_blocks {
                    content::java_old_page(buf, mix(self.seed, i as u64));
                } else if i < old_blocks + nursery_blocks {
                    content::java_objects_page(buf, mix(self.seed, i as u64));
                } else {
                    buf.fill(0);
                }
            }
        }
    }

    /// Fills every record of an existing store.
    pub fn fill(&self, store: &mut Store) {
        for i in 0..store.blocks() {
            store.fill(i, |b| self.fill_block(i, b));
        }
    }

    /// A new store holding the initial content (what the guest does once at start).
    pub fn build_store(&self) -> Store {
        Store::with_content(self.blocks, |i, b| self.fill_block(i, b))
    }

    /// One modification touching one page, as the application would at `time_s`.
    /// Returns the record written.
    pub fn touch(&mut self, store: &mut Store, time_s: u64) -> Result<usize, Corruption> {
        debug_assert_eq!(store.blocks(), self.blocks);
        self.touches += 1;
        let version = mix(self.seed, self.touches);
        let rng = &mut self.rng;
        match &mut self.layout {
            Layout::Files {
                files,
                objects,
                cursor,
            } => {
                if !objects.is_empty() && rng.chance(700) {
                    // The build writes the next page of the next object file.
                    let f = files[objects[cursor.0]];
                    let page = cursor.1;
                    *cursor = if page + 1 < f.pages {
                        (cursor.0, page + 1)
                    } else {
                        ((cursor.0 + 1) % objects.len(), 0)
                    };
                    let i = f.start + page;
                    store.modify(i, |b| file_page(&f, page, version, b))?;
                    Ok(i)
                } else {
                    // A small edit somewhere: a word or two rewritten in place.
                    let i = rng.below(self.blocks);
                    let len = rng.range(8, 48);
                    let at = rng.below(BLOCK_BYTES - len);
                    store.modify(i, |b| {
                        let mut w = content::PageWriter::new(&mut b[at..at + len]);
                        let mut r = Rng::new(version);
                        let words = &content::vocab().words;
                        while !w.full() {
                            w.word_sep(&r.pick_skewed(words));
                        }
                    })?;
                    Ok(i)
                }
            }
            Layout::Table => {
                let i = rng.below(self.blocks);
                let rows = rng.range(1, 3);
                let first = rng.below(ROWS_PER_BLOCK);
                let seed = self.seed;
                store.modify(i, |b| {
                    for k in 0..rows {
                        let r = (first + k * 5) % ROWS_PER_BLOCK;
                        let row = &mut b[r * content::ROW_BYTES..(r + 1) * content::ROW_BYTES];
                        content::db_row_update(row, seed, mix(version, k as u64), time_s);
                    }
                })?;
                Ok(i)
            }
            Layout::Heap {
                old_blocks,
                nursery_blocks,
                cursor,
            } => {
                if self.touches % PROMOTE_EVERY == 0 || *nursery_blocks == 0 {
                    // Promotion: a few surviving objects copied into an old-generation page.
                    let i = rng.below(*old_blocks);
                    let len = 8 * rng.range(8, 32);
                    let at = 8 * rng.below((BLOCK_BYTES - len) / 8);
                    store.modify(i, |b| {
                        let mut objs = [0u8; BLOCK_BYTES];
                        content::java_objects_page(&mut objs, version);
                        b[at..at + len].copy_from_slice(&objs[..len]);
                    })?;
                    Ok(i)
                } else {
                    // Allocation: the bump pointer moves through the nursery, wrapping at
                    // each minor collection.
                    let i = *old_blocks + *cursor;
                    *cursor = (*cursor + 1) % *nursery_blocks;
                    store.modify(i, |b| content::java_objects_page(b, version))?;
                    Ok(i)
                }
            }
        }
    }
}

fn file_page(f: &FileExtent, page: usize, seed: u64, buf: &mut [u8]) {
    let s = mix(seed, page as u64);
    match f.kind {
        FileKind::Text => content::text_page(buf, s),
        FileKind::CSource => content::c_source_page(buf, s, page),
        FileKind::CHeader => content::c_header_page(buf, s, page),
        FileKind::Object => content::object_page(buf, s, page),
    }
}

fn file_layout(blocks: usize, seed: u64) -> Layout {
    let mut rng = Rng::fork(seed, 0x6c61_796f_7574);
    let mut files: Vec<FileExtent> = Vec::new();
    let mut objects = Vec::new();
    let mut start = 0;
    while start < blocks {
        let mut f = if !files.is_empty() && rng.chance(DUPLICATE_FILES_PER_MILLE) {
            // The same file cached twice (a copied tree, a generated header): identical
            // pages for deduplication to find.
            let src = files[rng.below(files.len())];
            FileExtent { start, ..src }
        } else {
            let (kind, pages) = match rng.below(20) {
                0..=7 => (FileKind::CSource, rng.range(1, 8)),
                8..=11 => (FileKind::CHeader, rng.range(1, 3)),
                12..=14 => (FileKind::Text, rng.range(1, 6)),
                _ => (FileKind::Object, rng.range(2, 12)),
            };
            FileExtent {
                start,
                pages,
                kind,
                seed: rng.next_u64(),
            }
        };
        f.pages = f.pages.min(blocks - start);
        if f.kind == FileKind::Object {
            objects.push(files.len());
        }
        files.push(f);
        start += f.pages;
    }
    Layout::Files {
        files,
        objects,
        cursor: (0, 0),
    }
}

/// Spreads page writes at a target rate over time, in whole pages.
///
/// Credit accrues at `pages_per_s` and is capped at [`Pacer::MAX_BURST_S`] worth, so a
/// guest that was paused (a migration's stop-and-copy) or starved does not come back with
/// a burst of writes far above the configured rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    pages_per_s: f64,
    credit: f64,
    last_ns: Option<u64>,
}

impl Pacer {
    /// The largest backlog of writes, in seconds of rate, that is still made up for.
    pub const MAX_BURST_S: f64 = 0.25;

    /// `rate_mbps` in MiB/s of pages touched (1 MiB = 256 pages); 0 writes nothing.
    pub fn new(rate_mbps: f64) -> Self {
        Self {
            pages_per_s: rate_mbps.max(0.0) * (1 << 20) as f64 / BLOCK_BYTES as f64,
            credit: 0.0,
            last_ns: None,
        }
    }

    pub fn pages_per_s(&self) -> f64 {
        self.pages_per_s
    }

    /// Pages to write now (`now_ns` on any monotonic clock); the caller writes them all.
    pub fn due(&mut self, now_ns: u64) -> u64 {
        let last = self.last_ns.replace(now_ns).unwrap_or(now_ns);
        let dt_s = now_ns.saturating_sub(last) as f64 / 1e9;
        let cap = (self.pages_per_s * Self::MAX_BURST_S).max(1.0);
        self.credit = (self.credit + dt_s * self.pages_per_s).min(cap);
        let n = self.credit.floor();
        self.credit -= n;
        n as u64
    }

    /// Nanoseconds from the last [`Pacer::due`] until the next page is due; `None` at rate 0.
    pub fn next_due_in_ns(&self) -> Option<u64> {
        (self.pages_per_s > 0.0)
            .then(|| (((1.0 - self.credit).max(0.0) / self.pages_per_s) * 1e9) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_for(w: &Workload, blocks: usize) -> Store {
        let mut s = Store::new(blocks);
        w.fill(&mut s);
        s
    }

    #[test]
    fn build_store_matches_fill_and_verifies_clean() {
        for p in Profile::ALL {
            let w = Workload::new(p, 300, 4);
            let built = w.build_store();
            let filled = store_for(&w, 300);
            assert!(built.as_bytes() == filled.as_bytes(), "{}", p.name());
            let report = crate::store::Verifier::new().step(&built, 1000).unwrap();
            assert!(report.ok(), "{}: {report:?}", p.name());
            assert_eq!(report.records, 300);
        }
    }

    #[test]
    fn profiles_parse_by_name() {
        for p in Profile::ALL {
            assert_eq!(Profile::parse(p.name()), Some(p));
        }
        assert_eq!(Profile::parse("webdb"), None);
    }

    #[test]
    fn web_db_touches_spread_over_the_whole_table() {
        let blocks = 256;
        let mut w = Workload::new(Profile::WebDb, blocks, 5);
        let mut s = store_for(&w, blocks);
        let mut seen = vec![false; blocks];
        for t in 0..4000 {
            seen[w.touch(&mut s, t / 100).unwrap()] = true;
        }
        // 4000 uniform draws over 256 pages miss any given page with p ≈ e^-15.6.
        assert!(seen.iter().all(|&b| b));
        // Every row still has its fixed id column and width.
        for i in 0..blocks {
            for (r, row) in s.block(i).chunks_exact(content::ROW_BYTES).enumerate() {
                let id = format!("{:010}", i * ROWS_PER_BLOCK + r + 1);
                assert_eq!(&row[..10], id.as_bytes());
                assert_eq!(row[content::ROW_BYTES - 1], b'\n');
            }
        }
    }

    #[test]
    fn java_heap_writes_stay_in_nursery_except_promotions() {
        let blocks = 800;
        let mut w = Workload::new(Profile::JavaHeap, blocks, 5);
        let mut s = store_for(&w, blocks);
        let hot = w.hot_range();
        assert_eq!(hot, 200..300);
        let (mut in_hot, mut in_old) = (0, 0);
        for _ in 0..3200 {
            let i = w.touch(&mut s, 0).unwrap();
            if hot.contains(&i) {
                in_hot += 1;
            } else {
                assert!(i < hot.start, "write into the free (zero) heap: {i}");
                in_old += 1;
            }
        }
        assert_eq!(in_old, 3200 / PROMOTE_EVERY as usize);
        assert_eq!(in_hot + in_old, 3200);
        // The free part of the heap stays zero.
        assert!(s.as_bytes()[300 * BLOCK_BYTES..].iter().all(|&b| b == 0));
    }

    #[test]
    fn idle_never_writes_and_kernel_compile_writes_objects_and_edits() {
        let blocks = 512;
        let w = Workload::new(Profile::Idle, blocks, 1);
        assert_eq!(Profile::Idle.default_rate_mbps(), 0.0);
        let s = store_for(&w, blocks);
        let mut k = Workload::new(Profile::KernelCompile, blocks, 1);
        let mut sk = store_for(&k, blocks);
        // Same seed, same page cache: idle and kernel-compile start from the same content.
        assert_eq!(s.as_bytes(), sk.as_bytes());
        let before = sk.as_bytes().to_vec();
        for _ in 0..1000 {
            k.touch(&mut sk, 0).unwrap();
        }
        let changed = (0..blocks)
            .filter(|&i| sk.block(i) != &before[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES])
            .count();
        assert!(changed > 50 && changed < blocks, "changed={changed}");
    }

    #[test]
    fn small_stores_work_for_every_profile() {
        for p in Profile::ALL {
            for blocks in [1, 2, 3, 9] {
                let mut w = Workload::new(p, blocks, 2);
                let mut s = store_for(&w, blocks);
                for t in 0..50 {
                    let i = w.touch(&mut s, t).unwrap();
                    assert!(i < blocks);
                }
            }
        }
    }

    #[test]
    fn pacer_honours_rate_in_virtual_time() {
        // 8 MiB/s = 2048 pages/s, driven by irregular ticks from 0.1 ms to 40 ms.
        let mut p = Pacer::new(8.0);
        let mut rng = Rng::new(3);
        let (mut now, mut pages) = (0u64, 0u64);
        while now < 10_000_000_000 {
            pages += p.due(now);
            now += rng.range(100_000, 40_000_000) as u64;
        }
        pages += p.due(now);
        let expect = 2048.0 * now as f64 / 1e9;
        assert!(
            (pages as f64 - expect).abs() < expect * 0.01,
            "{pages} vs {expect}"
        );
    }

    #[test]
    fn pacer_caps_the_backlog_after_a_stall() {
        let mut p = Pacer::new(8.0);
        assert_eq!(p.due(0), 0);
        // Paused for 5 s: only MAX_BURST_S worth is made up.
        assert_eq!(p.due(5_000_000_000), (2048.0 * Pacer::MAX_BURST_S) as u64);
        assert_eq!(Pacer::new(0.0).due(1_000_000_000), 0);
        assert_eq!(Pacer::new(0.0).next_due_in_ns(), None);
        let mut q = Pacer::new(1.0); // 256 pages/s: one every ~3.9 ms
        q.due(0);
        let wait = q.next_due_in_ns().unwrap();
        assert!((3_800_000..4_000_000).contains(&wait), "{wait}");
        assert_eq!(q.due(wait + 1_000), 1);
    }
}
