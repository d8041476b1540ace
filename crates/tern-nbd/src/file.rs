//! [`FileBackend`]: an export over a raw (possibly sparse) file or block device.
//!
//! Positional I/O only (`pread`/`pwrite`), so connections share one descriptor without
//! locking; there is no cache of our own, which is why [`Backend::multi_conn`] holds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::{Backend, Extent};

/// Zero buffer size for the write-zeroes fallback (when the file system cannot fallocate).
const ZERO_CHUNK_BYTES: usize = 1024 * 1024;
/// Most extents one block-status call returns; the client asks again for the rest.
const MAX_EXTENTS: usize = 1024;

/// An export over a raw file. Size is fixed at open.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBackend {
            file,
            size,
            read_only,
        })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond end of file",
            )),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check(offset, len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off_t(offset)?, off_t(len)?);
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let end = offset + len;
        while offset < end {
            let n = zeros
                .len()
                .min(usize::try_from(end - offset).unwrap_or(usize::MAX));
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn durable_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.file.sync_data() } else { Ok(()) }
    }

    /// `lseek(fd, pos, whence)`; `Ok(None)` for ENXIO (no data at or after `pos`).
    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek only reads its integer arguments; the descriptor is owned by
        // `self.file` and open. It moves the shared file position, which nothing here uses
        // (all I/O is positional).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off_t(pos)?, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(error)
        }
    }
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// The file system cannot do this fallocate mode; fall back to plain writes.
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        self.durable_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, len)?;
        match self.punch_hole(offset, len) {
            // Trim is advisory: a file system without hole punching simply keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }?;
        self.durable_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_writable(offset, len)?;
        let mut done = may_trim && self.punch_hole(offset, len).is_ok();
        if !done {
            done = match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => true,
                Err(e) if unsupported(&e) => false,
                Err(e) => return Err(e),
            };
        }
        if !done {
            self.write_zero_bytes(offset, len)?;
        }
        self.durable_if(fua)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |len: u64, hole: bool| match extents.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ => extents.push(Extent {
                len,
                hole,
                zero: hole,
            }),
        };
        let mut pos = offset;
        let mut count = 0;
        while pos < end && count < MAX_EXTENTS {
            count += 1;
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(data) => data.unwrap_or(end).min(end),
                // No SEEK_DATA support: call everything data, which is always safe.
                Err(e) if unsupported(&e) => {
                    push(end - pos, false);
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                push(data - pos, true);
                pos = data;
                continue;
            }
            // At data: EOF counts as a hole, so SEEK_HOLE always finds one.
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            if hole <= pos {
                // The file changed under us (truncated?); report the rest as data.
                push(end - pos, false);
                break;
            }
            push(hole - pos, false);
            pos = hole;
        }
        if extents.is_empty() {
            extents.push(Extent {
                len,
                hole: false,
                zero: false,
            });
        }
        Ok(extents)
    }

    fn multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, size: u64) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("tern-nbd-file-{}-{name}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        path
    }

    #[test]
    fn sparse_file_reports_holes_and_data() {
        const MIB: u64 = 1 << 20;
        let path = temp_file("sparse", 8 * MIB);
        let backend = FileBackend::open(&path, false).unwrap();
        backend
            .write_at(2 * MIB, &vec![0xab; MIB as usize], true)
            .unwrap();
        let extents = backend.block_status(0, 8 * MIB).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 8 * MIB);
        assert!(extents[0].hole && extents[0].zero, "{extents:?}");
        let data: Vec<_> = extents.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "{extents:?}");

        backend.write_zeroes(2 * MIB, MIB, true, false).unwrap();
        let mut buf = vec![1; MIB as usize];
        backend.read_at(2 * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            backend
                .block_status(0, 8 * MIB)
                .unwrap()
                .iter()
                .all(|e| e.hole)
        );

        backend.write_at(0, &[7; 4096], false).unwrap();
        backend.write_zeroes(0, 4096, false, true).unwrap();
        backend.read_at(0, &mut buf[..4096]).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(
            !backend.block_status(0, 4096).unwrap()[0].hole,
            "NO_HOLE keeps the block allocated"
        );

        assert!(backend.read_at(8 * MIB - 1, &mut buf[..2]).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let path = temp_file("ro", 4096);
        let backend = FileBackend::open(&path, true).unwrap();
        assert!(backend.read_only());
        let error = backend.write_at(0, b"x", false).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
        assert!(backend.trim(0, 1, false).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
