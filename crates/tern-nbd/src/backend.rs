//! What an export is backed by, and how a [`Request`] runs against it.

use std::io;
use std::sync::{Arc, Mutex};

use crate::proto::{Command, NbdError, Reply, Request};

/// Extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

/// Storage behind one export. Calls may come from several connections at once; ranges are
/// always inside `[0, size())` (the session checks before calling).
pub trait Backend: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `fua`: durable before returning.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// `may_trim`: the range may be deallocated (client did not set NO_HOLE).
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// Allocation of [offset, offset+len): at least one extent, in order, summing to <= len.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
    /// A flush or FUA write on one connection is durable for every connection's writes
    /// (no per-connection cache), so clients may spread I/O over several connections.
    fn multi_conn(&self) -> bool {
        false
    }
}

impl<T: Backend + ?Sized> Backend for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        (**self).write_at(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        (**self).trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, len, may_trim, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        (**self).block_status(offset, len)
    }
    fn multi_conn(&self) -> bool {
        (**self).multi_conn()
    }
}

/// The NBD error for a backend failure: ENOSPC/EDQUOT/EFBIG → `NBD_ENOSPC`, EPERM/EROFS/
/// EACCES → `NBD_EPERM`, invalid input → `NBD_EINVAL`, anything else → `NBD_EIO`.
pub fn nbd_error(error: &io::Error) -> NbdError {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => return NbdError::NoSpc,
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => return NbdError::Perm,
        Some(libc::EINVAL) => return NbdError::Inval,
        _ => {}
    }
    match error.kind() {
        io::ErrorKind::InvalidInput => NbdError::Inval,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NbdError::Perm,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            NbdError::NoSpc
        }
        _ => NbdError::Io,
    }
}

/// Runs `request` against `backend`; the answer to hand to
/// [`ServerSession::reply`](crate::proto::ServerSession::reply).
pub fn execute<B: Backend + ?Sized>(backend: &B, request: &Request) -> Result<Reply, io::Error> {
    let (offset, len) = (request.offset, u64::from(request.len));
    match &request.command {
        Command::Read => {
            let mut buf = vec![0; request.len as usize];
            backend.read_at(offset, &mut buf)?;
            Ok(Reply::Data(buf))
        }
        Command::Write(data) => backend
            .write_at(offset, data, request.fua)
            .map(|()| Reply::Done),
        Command::Flush => backend.flush().map(|()| Reply::Done),
        Command::Trim => backend.trim(offset, len, request.fua).map(|()| Reply::Done),
        Command::WriteZeroes { may_trim } => backend
            .write_zeroes(offset, len, *may_trim, request.fua)
            .map(|()| Reply::Done),
        Command::BlockStatus => backend.block_status(offset, len).map(Reply::Extents),
    }
}

/// A backend in memory, for tests and simulations: reports every block as data.
#[derive(Debug)]
pub struct MemBackend {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemBackend {
    pub fn new(size: usize, read_only: bool) -> Self {
        MemBackend {
            bytes: Mutex::new(vec![0; size]),
            read_only,
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes half-updated in a way
        // that matters more than the panic itself.
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn range(&self, len_bytes: usize, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len));
        match end {
            Some(end) if end <= len_bytes => Ok(start..end),
            _ => Err(io::ErrorKind::InvalidInput.into()),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.lock();
        let range = self.range(bytes.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&bytes[range]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.writable()?;
        let mut bytes = self.lock();
        let range = self.range(bytes.len(), offset, data.len() as u64)?;
        bytes[range].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, true, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        self.writable()?;
        let mut bytes = self.lock();
        let range = self.range(bytes.len(), offset, len)?;
        bytes[range].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let bytes = self.lock();
        self.range(bytes.len(), offset, len)?;
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
    fn multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_nbd_errors() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(nbd_error(&os(libc::ENOSPC)), NbdError::NoSpc);
        assert_eq!(nbd_error(&os(libc::EDQUOT)), NbdError::NoSpc);
        assert_eq!(nbd_error(&os(libc::EPERM)), NbdError::Perm);
        assert_eq!(nbd_error(&os(libc::EROFS)), NbdError::Perm);
        assert_eq!(nbd_error(&os(libc::EIO)), NbdError::Io);
        assert_eq!(nbd_error(&os(libc::EINVAL)), NbdError::Inval);
        assert_eq!(
            nbd_error(&io::ErrorKind::InvalidInput.into()),
            NbdError::Inval
        );
        assert_eq!(
            nbd_error(&io::ErrorKind::UnexpectedEof.into()),
            NbdError::Io
        );
    }

    #[test]
    fn mem_backend_checks_ranges_and_read_only() {
        let mem = MemBackend::new(16, false);
        mem.write_at(4, b"abcd", false).unwrap();
        let mut buf = [0; 4];
        mem.read_at(4, &mut buf).unwrap();
        assert_eq!(&buf, b"abcd");
        assert!(mem.write_at(14, b"abcd", false).is_err());
        assert!(mem.read_at(u64::MAX, &mut buf).is_err());
        let ro = MemBackend::new(16, true);
        assert_eq!(
            nbd_error(&ro.write_at(0, b"x", false).unwrap_err()),
            NbdError::Perm
        );
    }
}
