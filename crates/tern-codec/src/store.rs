//! The content store: pages by strong hash, kept across migrations at each site, so a VM
//! that comes back (follow-the-sun) or a similar VM sends references instead of pages.
//!
//! Keys are the first 16 bytes of BLAKE3 of the 4 KiB page. Before a migration the
//! destination sends a [`Summary`] of its keys (sorted 8-byte prefixes); the sender
//! references only pages whose prefix is in it, and the destination re-hashes every page it
//! reads from the store, so a stale or corrupt store entry is an error, never wrong memory.
//! While a summary is outstanding the store is pinned: inserts never evict.
//!
//! ```text
//! FileStore directory:
//!   pages   slot i at offset i*4096 (sparse, up to capacity slots)
//!   keys    slot i at offset i*16 (16-byte key, all zero = empty)
//!   head    u64 LE: the next slot to fill (FIFO over slots)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::PAGE;
use crate::cache::FastMap;
use crate::wire::{get_varint, put_varint};

pub type Key = [u8; 16];

pub fn page_key(page: &[u8]) -> Key {
    let h = blake3::hash(page);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

fn prefix(k: &Key) -> u64 {
    u64::from_le_bytes(k[..8].try_into().expect("8 bytes"))
}

/// What a store holds, as sorted 8-byte key prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    prefixes: Vec<u64>,
}

impl Summary {
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Summary {
        let mut prefixes: Vec<u64> = keys.into_iter().map(prefix).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        Summary { prefixes }
    }

    pub fn contains(&self, k: &Key) -> bool {
        self.prefixes.binary_search(&prefix(k)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// `count varint | first varint | gaps varint...`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.prefixes.len() as u64);
        let mut last = 0;
        for &p in &self.prefixes {
            put_varint(out, p - last);
            last = p;
        }
    }

    pub fn decode(mut b: &[u8]) -> Option<Summary> {
        let (n, used) = get_varint(b).ok()??;
        b = &b[used..];
        if n > (b.len() as u64) {
            return None;
        }
        let mut prefixes = Vec::with_capacity(n as usize);
        let mut last: u64 = 0;
        for i in 0..n {
            let (gap, used) = get_varint(b).ok()??;
            b = &b[used..];
            if i > 0 && gap == 0 {
                return None;
            }
            last = last.checked_add(gap)?;
            prefixes.push(last);
        }
        b.is_empty().then_some(Summary { prefixes })
    }
}

/// Pages by key.
pub trait ContentStore {
    /// Copies the page with this key into `out` if held and intact.
    fn get(&mut self, key: &Key, out: &mut [u8]) -> bool;
    /// Adds a page (a no-op if held, or if full while pinned).
    fn insert(&mut self, key: &Key, page: &[u8]);
    fn summary(&self) -> Summary;
    /// While pinned (counted), inserts do not evict.
    fn pin(&mut self);
    fn unpin(&mut self);
}

/// A store that holds nothing (the store optimization off).
#[derive(Debug, Default)]
pub struct NoStore;

impl ContentStore for NoStore {
    fn get(&mut self, _: &Key, _: &mut [u8]) -> bool {
        false
    }
    fn insert(&mut self, _: &Key, _: &[u8]) {}
    fn summary(&self) -> Summary {
        Summary::default()
    }
    fn pin(&mut self) {}
    fn unpin(&mut self) {}
}

/// In memory, unbounded (tests and simulations).
#[derive(Debug, Default)]
pub struct MemStore {
    pages: FastMap<Key, Box<[u8]>>,
}

impl ContentStore for MemStore {
    fn get(&mut self, key: &Key, out: &mut [u8]) -> bool {
        match self.pages.get(key) {
            Some(p) => {
                out.copy_from_slice(p);
                true
            }
            None => false,
        }
    }
    fn insert(&mut self, key: &Key, page: &[u8]) {
        self.pages.entry(*key).or_insert_with(|| page.into());
    }
    fn summary(&self) -> Summary {
        Summary::from_keys(self.pages.keys())
    }
    fn pin(&mut self) {}
    fn unpin(&mut self) {}
}

/// A bounded FIFO store in a directory (see the module doc for the layout).
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    pages: File,
    keys: File,
    head_file: File,
    capacity: u64,
    head: u64,
    slots: Vec<Key>,
    index: FastMap<Key, u64>,
    pinned: u32,
    /// Reads whose bytes did not match their key (corruption), for status.
    pub corrupt: u64,
}

impl FileStore {
    /// Opens or creates a store of `capacity` pages.
    pub fn open(dir: &Path, capacity: u64) -> io::Result<FileStore> {
        std::fs::create_dir_all(dir)?;
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let pages = open("pages")?;
        let keys = open("keys")?;
        let head_file = open("head")?;
        let mut raw = vec![0u8; (capacity * 16) as usize];
        let have = keys.metadata()?.len().min(capacity * 16) as usize;
        keys.read_exact_at(&mut raw[..have], 0)?;
        let mut slots = vec![[0u8; 16]; capacity as usize];
        let mut index = FastMap::default();
        for (i, k) in raw.chunks_exact(16).enumerate() {
            let k: Key = k.try_into().expect("16 bytes");
            if k != [0; 16] {
                slots[i] = k;
                index.insert(k, i as u64);
            }
        }
        let mut h = [0u8; 8];
        let head = match head_file.read_exact_at(&mut h, 0) {
            Ok(()) => u64::from_le_bytes(h) % capacity.max(1),
            Err(_) => 0,
        };
        Ok(FileStore {
            dir: dir.to_path_buf(),
            pages,
            keys,
            head_file,
            capacity,
            head,
            slots,
            index,
            pinned: 0,
            corrupt: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

impl ContentStore for FileStore {
    fn get(&mut self, key: &Key, out: &mut [u8]) -> bool {
        let Some(&slot) = self.index.get(key) else {
            return false;
        };
        if self.pages.read_exact_at(out, slot * PAGE as u64).is_err() || page_key(out) != *key {
            self.corrupt += 1;
            return false;
        }
        true
    }

    fn insert(&mut self, key: &Key, page: &[u8]) {
        if self.capacity == 0 || self.index.contains_key(key) {
            return;
        }
        let slot = self.head;
        let old = self.slots[slot as usize];
        if old != [0; 16] {
            if self.pinned > 0 {
                return;
            }
            self.index.remove(&old);
        }
        // Key last: a crash between the writes leaves an entry whose bytes fail the check.
        if self.pages.write_all_at(page, slot * PAGE as u64).is_err()
            || self.keys.write_all_at(key, slot * 16).is_err()
        {
            return;
        }
        self.slots[slot as usize] = *key;
        self.index.insert(*key, slot);
        self.head = (slot + 1) % self.capacity;
        let _ = self.head_file.write_all_at(&self.head.to_le_bytes(), 0);
    }

    fn summary(&self) -> Summary {
        Summary::from_keys(self.index.keys())
    }

    fn pin(&mut self) {
        self.pinned += 1;
    }

    fn unpin(&mut self) {
        self.pinned = self.pinned.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    #[test]
    fn summary_round_trips() {
        let keys: Vec<Key> = (1..50u8).map(|i| page_key(&page(i))).collect();
        let s = Summary::from_keys(&keys);
        let mut b = Vec::new();
        s.encode(&mut b);
        let d = Summary::decode(&b).unwrap();
        assert_eq!(d, s);
        assert!(keys.iter().all(|k| d.contains(k)));
        assert!(!d.contains(&page_key(&page(99))));
        assert!(Summary::decode(&b[..b.len() - 1]).is_none());
    }

    #[test]
    fn file_store_persists_evicts_and_detects_corruption() {
        let dir = std::env::temp_dir().join(format!("tern-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut out = vec![0u8; PAGE];
        {
            let mut s = FileStore::open(&dir, 3).unwrap();
            for i in 1..=3 {
                s.insert(&page_key(&page(i)), &page(i));
            }
            assert!(s.get(&page_key(&page(2)), &mut out));
            assert_eq!(out, page(2));
            s.pin();
            s.insert(&page_key(&page(4)), &page(4));
            assert!(!s.get(&page_key(&page(4)), &mut out), "pinned: no eviction");
            s.unpin();
            s.insert(&page_key(&page(4)), &page(4));
            assert!(!s.get(&page_key(&page(1)), &mut out), "oldest evicted");
        }
        let mut s = FileStore::open(&dir, 3).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.get(&page_key(&page(4)), &mut out));
        assert!(s.summary().contains(&page_key(&page(3))));
        // Corrupt slot of page 3 (slot 2).
        s.pages.write_all_at(&[9], 2 * PAGE as u64 + 7).unwrap();
        assert!(!s.get(&page_key(&page(3)), &mut out));
        assert_eq!(s.corrupt, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
