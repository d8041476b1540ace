//! The two caches both ends keep in step: the sub-block ring (redundancy elimination) and
//! the per-page last versions (deltas). Both are pure functions of the page sequence, so the
//! encoder's and the decoder's copies stay identical without any messages.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::{PAGE, SUB};

/// Default ring capacity in sub-blocks (64 MiB of 1 KiB blocks).
pub const RING_BLOCKS: usize = 64 * 1024;
/// Default page-cache capacity in pages (1 GiB).
pub const CACHE_PAGES: usize = 256 * 1024;

/// Hasher for keys that are already well mixed (block hashes, page keys, content-store
/// keys): one multiply instead of SipHash, which cost a third of the encoder's time.
#[derive(Debug, Default, Clone, Copy)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// A HashMap with [`MixHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// A fast 64-bit hash of a sub-block, used only to find candidates (bytes are compared).
pub fn block_hash(b: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for w in b.chunks_exact(8) {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ v).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
    }
    h ^ (h >> 32)
}

/// FIFO ring of 1 KiB sub-blocks addressed by sequence number; the sender side also keeps a
/// hash index to find earlier copies.
#[derive(Debug)]
pub struct SubBlockRing {
    cap: usize,
    data: Vec<u8>,
    hashes: Vec<u64>,
    next: u64,
    index: Option<FastMap<u64, u64>>,
}

impl SubBlockRing {
    /// `indexed`: keep the hash index (the encoder's side).
    pub fn new(cap: usize, indexed: bool) -> SubBlockRing {
        assert!(cap > 0);
        SubBlockRing {
            cap,
            data: Vec::new(),
            hashes: Vec::new(),
            next: 0,
            index: indexed.then(FastMap::default),
        }
    }

    /// Sequence number the next pushed block gets.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    pub fn get(&self, seq: u64) -> Option<&[u8]> {
        if seq >= self.next || self.next - seq > self.cap as u64 {
            return None;
        }
        let slot = (seq % self.cap as u64) as usize;
        Some(&self.data[slot * SUB..(slot + 1) * SUB])
    }

    /// Finds an identical earlier block: its sequence number (bytes compared).
    pub fn find(&self, block: &[u8], hash: u64) -> Option<u64> {
        let seq = *self.index.as_ref()?.get(&hash)?;
        (self.get(seq)? == block).then_some(seq)
    }

    pub fn push(&mut self, block: &[u8], hash: u64) {
        debug_assert_eq!(block.len(), SUB);
        let slot = (self.next % self.cap as u64) as usize;
        if self.data.len() < (slot + 1) * SUB {
            self.data.extend_from_slice(block);
            self.hashes.push(hash);
        } else {
            if let Some(ix) = &mut self.index {
                let old = self.hashes[slot];
                let evicted = self.next - self.cap as u64;
                if ix.get(&old) == Some(&evicted) {
                    ix.remove(&old);
                }
            }
            self.data[slot * SUB..(slot + 1) * SUB].copy_from_slice(block);
            self.hashes[slot] = hash;
        }
        if let Some(ix) = &mut self.index {
            ix.insert(hash, self.next);
        }
        self.next += 1;
    }
}

/// The last version sent of each page, by key, FIFO-evicted at capacity.
#[derive(Debug)]
pub struct PageCache {
    cap: usize,
    data: Vec<u8>,
    slots: FastMap<u64, usize>,
    order: VecDeque<u64>,
}

impl PageCache {
    pub fn new(cap: usize) -> PageCache {
        assert!(cap > 0);
        PageCache {
            cap,
            data: Vec::new(),
            slots: FastMap::default(),
            order: VecDeque::new(),
        }
    }

    pub fn get(&self, key: u64) -> Option<&[u8]> {
        let s = *self.slots.get(&key)?;
        Some(&self.data[s * PAGE..(s + 1) * PAGE])
    }

    pub fn insert(&mut self, key: u64, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE);
        let slot = if let Some(&s) = self.slots.get(&key) {
            s
        } else if self.slots.len() < self.cap {
            let s = self.slots.len();
            self.data.resize((s + 1) * PAGE, 0);
            self.slots.insert(key, s);
            self.order.push_back(key);
            s
        } else {
            let old = self.order.pop_front().expect("full cache has entries");
            let s = self.slots.remove(&old).expect("ordered keys are mapped");
            self.slots.insert(key, s);
            self.order.push_back(key);
            s
        };
        self.data[slot * PAGE..(slot + 1) * PAGE].copy_from_slice(page);
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_finds_and_forgets() {
        let mut r = SubBlockRing::new(2, true);
        let a = [1u8; SUB];
        let b = [2u8; SUB];
        let c = [3u8; SUB];
        r.push(&a, block_hash(&a));
        r.push(&b, block_hash(&b));
        assert_eq!(r.find(&a, block_hash(&a)), Some(0));
        assert_eq!(r.get(1), Some(&b[..]));
        r.push(&c, block_hash(&c));
        assert_eq!(r.find(&a, block_hash(&a)), None, "evicted");
        assert_eq!(r.get(0), None);
        assert_eq!(r.find(&c, block_hash(&c)), Some(2));
        // A colliding hash with different bytes is not a hit.
        assert_eq!(r.find(&a, block_hash(&c)), None);
    }

    #[test]
    fn page_cache_evicts_fifo() {
        let mut c = PageCache::new(2);
        c.insert(1, &[1; PAGE]);
        c.insert(2, &[2; PAGE]);
        c.insert(1, &[3; PAGE]);
        assert_eq!(c.get(1).unwrap()[0], 3);
        c.insert(3, &[4; PAGE]);
        assert!(c.get(1).is_none(), "oldest key evicted");
        assert_eq!(c.get(2).unwrap()[0], 2);
        assert_eq!(c.len(), 2);
    }
}
