//! Per-VM fingerprints: the sorted set of unique page hashes.
//!
//! Duplicates inside one VM (self-sharing, including zero pages) are removed from the set
//! and counted separately: the hypervisor merges them wherever the VM runs, so they do not
//! depend on placement. `pages_total - unique_pages()` is the self-shared page count.
//!
//! Wire format (`encode`/`decode`), little-endian:
//! `"TMFP" | version u8 (=1) | pages_total u64 | zero_pages u64 | count u64 | count × u64`
//! hashes strictly increasing. Decoding is bounded by [`MAX_FINGERPRINT_HASHES`] and checks
//! the exact length, the order and `count <= pages_total`.

use std::collections::HashMap;

use crate::MembuddiesError;
use crate::hash::{PAGE_SIZE_BYTES, page_hash};

/// Most hashes a fingerprint may hold (2^28 pages = 1 TiB of 4 KiB pages, a 2 GiB list);
/// decode refuses larger ones with [`MembuddiesError::Limit`].
pub const MAX_FINGERPRINT_HASHES: u64 = 1 << 28;

const FP_MAGIC: &[u8; 4] = b"TMFP";
/// Current fingerprint encoding version.
pub const FP_VERSION: u8 = 1;
const FP_HEADER_BYTES: usize = 4 + 1 + 8 + 8 + 8;

/// The sorted unique page-hash set of one VM (or the union of several: a host).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    hashes: Vec<u64>,
    pages_total: u64,
    zero_pages: u64,
}

impl Fingerprint {
    /// From any sequence of page hashes (one per page): sorts and removes duplicates.
    pub fn from_page_hashes(mut hashes: Vec<u64>) -> Self {
        let pages_total = hashes.len() as u64;
        hashes.sort_unstable();
        hashes.dedup();
        Self {
            hashes,
            pages_total,
            zero_pages: 0,
        }
    }

    /// Unique hashes, sorted ascending.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }
    pub fn unique_pages(&self) -> u64 {
        self.hashes.len() as u64
    }
    /// Pages scanned (with duplicates).
    pub fn pages_total(&self) -> u64 {
        self.pages_total
    }
    /// Pages that duplicate another page of the same VM (merged regardless of placement).
    pub fn self_shared_pages(&self) -> u64 {
        self.pages_total - self.unique_pages()
    }
    /// All-zero pages seen by the builder (0 if unknown).
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }
    pub fn contains(&self, h: u64) -> bool {
        self.hashes.binary_search(&h).is_ok()
    }
    /// Bytes of the encoded hash list.
    pub fn encoded_len_bytes(&self) -> usize {
        FP_HEADER_BYTES + 8 * self.hashes.len()
    }

    /// Union (a host's fingerprint): unique hashes of all inputs; `pages_total` is the sum.
    pub fn union<'a>(fps: impl IntoIterator<Item = &'a Fingerprint>) -> Fingerprint {
        let mut acc: Vec<u64> = Vec::new();
        let mut total = 0u64;
        let mut zeros = 0u64;
        for f in fps {
            total += f.pages_total;
            zeros += f.zero_pages;
            acc = merge_union(&acc, &f.hashes);
        }
        Fingerprint {
            hashes: acc,
            pages_total: total,
            zero_pages: zeros,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_bytes());
        out.extend_from_slice(FP_MAGIC);
        out.push(FP_VERSION);
        out.extend_from_slice(&self.pages_total.to_le_bytes());
        out.extend_from_slice(&self.zero_pages.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, MembuddiesError> {
        let bad = |detail: String| MembuddiesError::Decode {
            what: "fingerprint",
            detail,
        };
        if b.len() < FP_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, header needs {FP_HEADER_BYTES}",
                b.len()
            )));
        }
        if &b[..4] != FP_MAGIC {
            return Err(bad("bad magic".into()));
        }
        if b[4] != FP_VERSION {
            return Err(bad(format!("version {} (supported: {FP_VERSION})", b[4])));
        }
        let pages_total = read_u64(&b[5..]);
        let zero_pages = read_u64(&b[13..]);
        let count = read_u64(&b[21..]);
        if count > MAX_FINGERPRINT_HASHES {
            return Err(MembuddiesError::Limit {
                what: "fingerprint hash count",
                limit: MAX_FINGERPRINT_HASHES,
            });
        }
        if count > pages_total || zero_pages > pages_total {
            return Err(bad(format!(
                "{count} unique / {zero_pages} zero of {pages_total} pages"
            )));
        }
        let want = FP_HEADER_BYTES as u64 + 8 * count;
        if b.len() as u64 != want {
            return Err(bad(format!("{} bytes, header says {want}", b.len())));
        }
        let mut hashes = Vec::with_capacity(count as usize);
        for c in b[FP_HEADER_BYTES..].chunks_exact(8) {
            let h = read_u64(c);
            if hashes.last().is_some_and(|&p| p >= h) {
                return Err(bad("hashes not strictly increasing".into()));
            }
            hashes.push(h);
        }
        Ok(Self {
            hashes,
            pages_total,
            zero_pages,
        })
    }
}

pub(crate) fn read_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

fn merge_union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Most sub-page chunks per page (§4.7.7 went up to 32).
pub const MAX_CHUNKS_PER_PAGE: usize = 64;

/// Streams pages (or raw bytes) into a fingerprint. Sans-IO: callers push bytes.
#[derive(Debug)]
pub struct FingerprintBuilder {
    hashes: Vec<u64>,
    zero_pages: u64,
    partial: Vec<u8>,
    chunks_per_page: usize,
}

impl Default for FingerprintBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FingerprintBuilder {
    pub fn new() -> Self {
        Self {
            hashes: Vec::new(),
            zero_pages: 0,
            partial: Vec::new(),
            chunks_per_page: 1,
        }
    }

    /// Sub-page sharing (seed §4.7.7): hash each page as `n` equal chunks, so the
    /// fingerprint's units are chunks (`pages_total` counts chunks). `n` must be a power of
    /// two in `1..=MAX_CHUNKS_PER_PAGE`.
    pub fn with_subpage_chunks(n: usize) -> Result<Self, MembuddiesError> {
        if !n.is_power_of_two() || n > MAX_CHUNKS_PER_PAGE {
            return Err(MembuddiesError::BadShape {
                detail: format!("{n} chunks per page (powers of two up to {MAX_CHUNKS_PER_PAGE})"),
            });
        }
        let mut b = Self::new();
        b.chunks_per_page = n;
        Ok(b)
    }

    /// Hash one whole page (as `chunks_per_page` chunks).
    pub fn push_page(&mut self, page: &[u8]) {
        if page.iter().all(|&b| b == 0) {
            self.zero_pages += 1;
        }
        if self.chunks_per_page == 1 {
            self.hashes.push(page_hash(page));
        } else {
            let len = page.len().div_ceil(self.chunks_per_page).max(1);
            for c in page.chunks(len) {
                self.hashes.push(page_hash(c));
            }
        }
    }

    /// Push any number of bytes; whole pages are hashed as they complete.
    pub fn push_bytes(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let need = PAGE_SIZE_BYTES - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == PAGE_SIZE_BYTES {
                let p = std::mem::take(&mut self.partial);
                self.push_page(&p);
            }
        }
        let mut chunks = data.chunks_exact(PAGE_SIZE_BYTES);
        for p in &mut chunks {
            self.push_page(p);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    /// Per-page hashes so far, in page order (for [`PageMap`]).
    pub fn page_hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Finish: a trailing partial page is zero-padded to a whole page.
    pub fn finish(mut self) -> Fingerprint {
        if !self.partial.is_empty() {
            let mut p = std::mem::take(&mut self.partial);
            p.resize(PAGE_SIZE_BYTES, 0);
            self.push_page(&p);
        }
        let zero_pages = self.zero_pages;
        let mut f = Fingerprint::from_page_hashes(self.hashes);
        f.zero_pages = zero_pages;
        f
    }

    /// Finish and keep the per-page map for incremental updates.
    pub fn finish_map(mut self) -> PageMap {
        if !self.partial.is_empty() {
            let mut p = std::mem::take(&mut self.partial);
            p.resize(PAGE_SIZE_BYTES, 0);
            self.push_page(&p);
        }
        PageMap::new(self.hashes)
    }
}

/// What one page update did to the unique set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageChange {
    /// The old hash left the unique set (its last copy changed).
    pub removed: Option<u64>,
    /// The new hash joined the unique set (first copy).
    pub added: Option<u64>,
}

/// Incremental fingerprint: the hash of every page plus a multiplicity per hash, so a
/// changed page moves its old hash out and its new hash in, in O(1), without rehashing
/// other pages. Bloom filters cannot delete, so after updates the caller rebuilds the
/// filter from [`PageMap::fingerprint`] (O(unique pages), far cheaper than rehashing RAM).
#[derive(Debug, Clone)]
pub struct PageMap {
    per_page: Vec<u64>,
    counts: HashMap<u64, u32>,
}

impl PageMap {
    pub fn new(per_page: Vec<u64>) -> Self {
        let mut counts: HashMap<u64, u32> = HashMap::with_capacity(per_page.len());
        for &h in &per_page {
            *counts.entry(h).or_insert(0) += 1;
        }
        Self { per_page, counts }
    }

    pub fn pages(&self) -> u64 {
        self.per_page.len() as u64
    }
    pub fn unique_pages(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Page `index` now hashes to `new_hash`.
    pub fn update_page(
        &mut self,
        index: u64,
        new_hash: u64,
    ) -> Result<PageChange, MembuddiesError> {
        let pages = self.pages();
        let slot = self
            .per_page
            .get_mut(index as usize)
            .ok_or(MembuddiesError::PageOutOfRange { index, pages })?;
        let old = std::mem::replace(slot, new_hash);
        if old == new_hash {
            return Ok(PageChange {
                removed: None,
                added: None,
            });
        }
        let mut removed = None;
        if let Some(c) = self.counts.get_mut(&old) {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&old);
                removed = Some(old);
            }
        }
        let c = self.counts.entry(new_hash).or_insert(0);
        *c += 1;
        let added = (*c == 1).then_some(new_hash);
        Ok(PageChange { removed, added })
    }

    /// Rehash page `index` from its new contents.
    pub fn update_page_bytes(
        &mut self,
        index: u64,
        page: &[u8],
    ) -> Result<PageChange, MembuddiesError> {
        self.update_page(index, page_hash(page))
    }

    /// The current fingerprint (sorted unique hashes).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut hashes: Vec<u64> = self.counts.keys().copied().collect();
        hashes.sort_unstable();
        Fingerprint {
            hashes,
            pages_total: self.pages(),
            zero_pages: self
                .counts
                .get(&page_hash(&[0u8; PAGE_SIZE_BYTES]))
                .copied()
                .unwrap_or(0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn image(seed: u64, pages: usize, dup_every: usize) -> Vec<u8> {
        let mut r = SplitMix64::new(seed);
        let mut v = vec![0u8; pages * PAGE_SIZE_BYTES];
        for p in 0..pages {
            if p % dup_every == 0 {
                continue; // zero page (self-shared)
            }
            for w in v[p * PAGE_SIZE_BYTES..(p + 1) * PAGE_SIZE_BYTES].chunks_exact_mut(8) {
                w.copy_from_slice(&r.next_u64().to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn self_sharing_counted_separately() {
        let img = image(1, 64, 4); // 16 zero pages, 48 distinct
        let mut b = FingerprintBuilder::new();
        b.push_bytes(&img);
        let f = b.finish();
        assert_eq!(f.pages_total(), 64);
        assert_eq!(f.unique_pages(), 49);
        assert_eq!(f.self_shared_pages(), 15);
        assert_eq!(f.zero_pages(), 16);
        assert!(f.hashes().windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn streaming_in_odd_chunks_equals_whole_pages() {
        let img = image(2, 10, 3);
        let mut a = FingerprintBuilder::new();
        a.push_bytes(&img);
        let mut b = FingerprintBuilder::new();
        for c in img.chunks(1000) {
            b.push_bytes(c);
        }
        assert_eq!(a.finish(), b.finish());
        // A trailing partial page counts as one zero-padded page.
        let mut c = FingerprintBuilder::new();
        c.push_bytes(&img[..PAGE_SIZE_BYTES + 10]);
        assert_eq!(c.finish().pages_total(), 2);
    }

    #[test]
    fn subpage_chunks_find_sharing_whole_pages_miss() {
        // Two pages equal in their first half only: no whole-page sharing, half the chunks.
        let mut r = SplitMix64::new(8);
        let mut a = vec![0u8; PAGE_SIZE_BYTES];
        for w in a.chunks_exact_mut(8) {
            w.copy_from_slice(&r.next_u64().to_le_bytes());
        }
        let mut b = a.clone();
        for w in b[PAGE_SIZE_BYTES / 2..].chunks_exact_mut(8) {
            w.copy_from_slice(&r.next_u64().to_le_bytes());
        }
        let fp = |n: usize, p: &[u8]| {
            let mut x = FingerprintBuilder::with_subpage_chunks(n).unwrap();
            x.push_page(p);
            x.finish()
        };
        let shared = |n| crate::estimate::exact_shared(fp(n, &a).hashes(), fp(n, &b).hashes());
        assert_eq!(shared(1), 0);
        assert_eq!(shared(2), 1);
        assert_eq!(shared(8), 4);
        assert_eq!(fp(8, &a).pages_total(), 8);
        assert!(FingerprintBuilder::with_subpage_chunks(3).is_err());
        assert!(FingerprintBuilder::with_subpage_chunks(128).is_err());
    }

    #[test]
    fn encode_decode_round_trip_and_bounds() {
        let mut b = FingerprintBuilder::new();
        b.push_bytes(&image(3, 40, 5));
        let f = b.finish();
        let e = f.encode();
        assert_eq!(e.len(), f.encoded_len_bytes());
        assert_eq!(Fingerprint::decode(&e).unwrap(), f);
        // Truncated, trailing garbage, wrong version, unsorted, oversize count.
        assert!(Fingerprint::decode(&e[..e.len() - 1]).is_err());
        let mut x = e.clone();
        x.push(0);
        assert!(Fingerprint::decode(&x).is_err());
        let mut x = e.clone();
        x[4] = 2;
        assert!(Fingerprint::decode(&x).is_err());
        let mut x = e.clone();
        let n = x.len();
        x.copy_within(n - 16..n - 8, n - 8); // last == second to last
        assert!(Fingerprint::decode(&x).is_err());
        let mut x = e[..FP_HEADER_BYTES].to_vec();
        x[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        x[21..29].copy_from_slice(&(MAX_FINGERPRINT_HASHES + 1).to_le_bytes());
        assert!(matches!(
            Fingerprint::decode(&x),
            Err(MembuddiesError::Limit { .. })
        ));
    }

    #[test]
    fn union_is_the_set_union() {
        let a = Fingerprint::from_page_hashes(vec![5, 1, 3, 3]);
        let b = Fingerprint::from_page_hashes(vec![2, 3, 9]);
        let u = Fingerprint::union([&a, &b]);
        assert_eq!(u.hashes(), &[1, 2, 3, 5, 9]);
        assert_eq!(u.pages_total(), 7);
    }

    #[test]
    fn incremental_update_matches_full_rehash() {
        let mut r = SplitMix64::new(9);
        let mut hashes: Vec<u64> = (0..500).map(|_| r.below(300)).collect();
        let mut map = PageMap::new(hashes.clone());
        for _ in 0..2000 {
            let i = r.below(500);
            let h = r.below(300);
            let before = map.fingerprint();
            let ch = map.update_page(i, h).unwrap();
            hashes[i as usize] = h;
            let full = Fingerprint::from_page_hashes(hashes.clone());
            assert_eq!(map.fingerprint().hashes(), full.hashes());
            if let Some(old) = ch.removed {
                assert!(before.contains(old) && !full.contains(old));
            }
            if let Some(new) = ch.added {
                assert!(!before.contains(new) && full.contains(new));
            }
        }
        assert!(map.update_page(500, 1).is_err());
    }
}
