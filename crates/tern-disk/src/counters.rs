//! A disk server's PipeCloud counters in a shared page (driver).
//!
//! A protected group's tiers have one disk server each; the gate of one tier holds frames
//! until the *other* tiers' disks have committed what those frames depend on (`nic.rs`,
//! `tern_gate::Group`). Each primary therefore publishes its write and committed counters
//! in a small file mapped shared (`DIR/disk-counters`, on tmpfs under /run), and peer gates
//! on the same host map it read-only. Layout, little-endian u64s: `magic "TERNCNT1" |
//! writes | committed | applied`. The write counter is published before the write's NBD
//! reply leaves, the committed counter whenever acknowledgements move it. A backup (a
//! secondary) publishes `applied`: the guest write its volume holds up to, which the
//! group's other backups wait for before applying writes that depend on it (`backup.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"TERNCNT1");
const PAGE: usize = 4096;

#[derive(Debug)]
pub struct CounterPage {
    ptr: *mut AtomicU64,
    _file: File,
}

// SAFETY: the mapping is only accessed through atomics, and lives as long as the value.
unsafe impl Send for CounterPage {}
// SAFETY: as above; all access is atomic.
unsafe impl Sync for CounterPage {}

impl CounterPage {
    /// Creates (or resets) the page of a primary at `path`, counters 0.
    pub fn create(path: &Path) -> io::Result<CounterPage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(PAGE as u64)?;
        let page = CounterPage::map(file, true)?;
        page.slot(1).store(0, Ordering::Release);
        page.slot(2).store(0, Ordering::Release);
        page.slot(3).store(0, Ordering::Release);
        page.slot(0).store(MAGIC, Ordering::Release);
        Ok(page)
    }

    /// Maps a peer's page read-only; fails until its server created it.
    pub fn open(path: &Path) -> io::Result<CounterPage> {
        let file = File::open(path)?;
        if file.metadata()?.len() < PAGE as u64 {
            return Err(io::Error::other("not a counter page (too short)"));
        }
        let page = CounterPage::map(file, false)?;
        if page.slot(0).load(Ordering::Acquire) != MAGIC {
            return Err(io::Error::other("not a counter page (magic)"));
        }
        Ok(page)
    }

    fn map(file: File, write: bool) -> io::Result<CounterPage> {
        use std::os::fd::AsRawFd;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of PAGE bytes of a file at least that long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(CounterPage {
            ptr: p.cast(),
            _file: file,
        })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < 4);
        // SAFETY: page-aligned mapping of PAGE bytes; slots 0..4 are in it and aligned.
        unsafe { &*self.ptr.add(i) }
    }

    pub fn publish(&self, writes: u64, committed: u64) {
        self.slot(1).store(writes, Ordering::Release);
        self.slot(2).store(committed, Ordering::Release);
    }

    pub fn publish_applied(&self, applied: u64) {
        self.slot(3).store(applied, Ordering::Release);
    }

    pub fn applied(&self) -> u64 {
        self.slot(3).load(Ordering::Acquire)
    }

    pub fn writes(&self) -> u64 {
        self.slot(1).load(Ordering::Acquire)
    }

    pub fn committed(&self) -> u64 {
        self.slot(2).load(Ordering::Acquire)
    }
}

impl Drop for CounterPage {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_sees_what_the_primary_publishes() {
        let dir = std::env::temp_dir().join(format!("tern-ctr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk-counters");
        assert!(CounterPage::open(&path).is_err(), "no page yet");
        let w = CounterPage::create(&path).unwrap();
        let r = CounterPage::open(&path).unwrap();
        w.publish(7, 5);
        w.publish_applied(4);
        assert_eq!((r.writes(), r.committed(), r.applied()), (7, 5, 4));
        std::fs::write(dir.join("junk"), vec![1u8; PAGE]).unwrap();
        assert!(CounterPage::open(&dir.join("junk")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
