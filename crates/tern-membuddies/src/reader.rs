//! Host-side driver (the only I/O in this crate): fingerprints a file (a raw memory image,
//! or a `memory-backend-file` on /dev/shm) or a range of a process's memory
//! (`/proc/PID/mem` at the guest-RAM mapping's address, from `/proc/PID/maps`).
//! Reads in [`READ_CHUNK_BYTES`] blocks and feeds a [`FingerprintBuilder`].

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::fingerprint::{FingerprintBuilder, PageMap};
use crate::hash::PAGE_SIZE_BYTES;

/// Read block size (256 pages).
pub const READ_CHUNK_BYTES: usize = 256 * PAGE_SIZE_BYTES;

/// A reader error with the file and offset it happened at.
#[derive(Debug, thiserror::Error)]
#[error("{what} at offset {offset}")]
pub struct ReadError {
    pub what: String,
    pub offset: u64,
    #[source]
    pub source: std::io::Error,
}

/// Fingerprint everything `r` yields.
pub fn fingerprint_reader(mut r: impl Read, what: &str) -> Result<FingerprintBuilder, ReadError> {
    let mut b = FingerprintBuilder::new();
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut off = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(b),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ReadError {
                    what: format!("read {what}"),
                    offset: off,
                    source,
                });
            }
        };
        b.push_bytes(&buf[..n]);
        off += n as u64;
    }
}

/// Fingerprint a whole file.
pub fn fingerprint_file(path: &Path) -> Result<FingerprintBuilder, ReadError> {
    let f = File::open(path).map_err(|source| ReadError {
        what: format!("open {}", path.display()),
        offset: 0,
        source,
    })?;
    fingerprint_reader(f, &path.display().to_string())
}

/// Fingerprint `len_bytes` of a file at `offset` with positioned reads; works on
/// `/proc/PID/mem` (needs ptrace permission over the process) where `offset` is the
/// virtual address of the guest-RAM mapping.
pub fn fingerprint_range(path: &Path, offset: u64, len_bytes: u64) -> Result<PageMap, ReadError> {
    let f = File::open(path).map_err(|source| ReadError {
        what: format!("open {}", path.display()),
        offset,
        source,
    })?;
    let mut b = FingerprintBuilder::new();
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut done = 0u64;
    while done < len_bytes {
        let want = (len_bytes - done).min(READ_CHUNK_BYTES as u64) as usize;
        let n = f
            .read_at(&mut buf[..want], offset + done)
            .map_err(|source| ReadError {
                what: format!("read {}", path.display()),
                offset: offset + done,
                source,
            })?;
        if n == 0 {
            break;
        }
        b.push_bytes(&buf[..n]);
        done += n as u64;
    }
    Ok(b.finish_map())
}

/// Fingerprint `len_bytes` of process `pid`'s memory starting at virtual address `addr`.
pub fn fingerprint_process(pid: u32, addr: u64, len_bytes: u64) -> Result<PageMap, ReadError> {
    fingerprint_range(Path::new(&format!("/proc/{pid}/mem")), addr, len_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn file_and_own_process_memory_agree() {
        let mut r = SplitMix64::new(21);
        let mut img = vec![0u8; 32 * PAGE_SIZE_BYTES];
        for (i, w) in img.chunks_exact_mut(8).enumerate() {
            // Pages 0..8 zero, 8..16 a repeated page, rest random.
            let p = i * 8 / PAGE_SIZE_BYTES;
            let v = if p < 8 {
                0
            } else if p < 16 {
                (i % 512) as u64
            } else {
                r.next_u64()
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
        let dir = std::env::temp_dir().join(format!("tern-mb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.raw");
        std::fs::write(&path, &img).unwrap();
        let f = fingerprint_file(&path).unwrap().finish();
        assert_eq!(
            (f.pages_total(), f.unique_pages(), f.zero_pages()),
            (32, 18, 8)
        );
        let part = fingerprint_range(
            &path,
            8 * PAGE_SIZE_BYTES as u64,
            8 * PAGE_SIZE_BYTES as u64,
        )
        .unwrap()
        .fingerprint();
        assert_eq!((part.pages_total(), part.unique_pages()), (8, 1));
        // Our own memory through /proc/self/mem, at the buffer's address.
        let addr = img.as_ptr() as u64;
        match fingerprint_process(std::process::id(), addr, img.len() as u64) {
            Ok(m) => assert_eq!(
                m.fingerprint().hashes(),
                Fingerprint::from_page_hashes(m_hashes(&img)).hashes()
            ),
            Err(e) => eprintln!("skipping /proc/self/mem part: {e}"),
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    use crate::fingerprint::Fingerprint;
    fn m_hashes(img: &[u8]) -> Vec<u64> {
        img.chunks(PAGE_SIZE_BYTES)
            .map(crate::hash::page_hash)
            .collect()
    }
}
