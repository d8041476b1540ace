//! A failing disk for tests: a FUSE file system that passes one flat directory through and,
//! on demand, fails the writes and syncs of one named file with a chosen errno (EIO,
//! ENOSPC, …), as a dying disk would, while every other file keeps working.
//!
//! ```no_run
//! let fs = tern_faultfs::FaultFs::mount("/srv/backing".as_ref(), "/srv/mnt".as_ref()).unwrap();
//! fs.fail("b.img", libc::EIO); // writes and fsyncs of /srv/mnt/b.img now fail
//! fs.heal();
//! ```
//!
//! What it serves: regular files in one directory (lookup, create, open, read, write,
//! truncate, fsync, rename, unlink, readdir, statfs); no subdirectories, links or xattrs.
//! Writes go through to the backing file before they are answered (FUSE without a
//! write-back cache), so the backing file holds exactly what the program above was told
//! was written. It needs root (a direct `mount` of `/dev/fuse`) or `fusermount3`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Attributes are never cached: a test may change the backing files behind the mount.
const TTL: Duration = Duration::ZERO;

/// What is failing, shared between the handle and the file system thread.
#[derive(Default)]
struct Faults {
    /// (file name, errno) whose writes and syncs fail.
    failing: Mutex<Option<(OsString, i32)>>,
    /// Operations refused so far.
    injected: AtomicU64,
}

impl Faults {
    /// The errno to answer for a write or sync of `name`, if it is failing now.
    fn check(&self, name: &OsStr) -> Option<Errno> {
        let f = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match &*f {
            Some((n, errno)) if n == name => {
                self.injected.fetch_add(1, Ordering::Relaxed);
                Some(Errno::from_i32(*errno))
            }
            _ => None,
        }
    }
}

/// A mounted fault file system; unmounted when dropped.
pub struct FaultFs {
    faults: Arc<Faults>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl FaultFs {
    /// Serves the files of `backing` at `mountpoint` (both existing directories).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<FaultFs> {
        if !backing.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("backing directory {} does not exist", backing.display()),
            ));
        }
        let faults = Arc::new(Faults::default());
        let fs = PassThrough {
            backing: backing.to_path_buf(),
            faults: faults.clone(),
            inodes: Mutex::new(Inodes::default()),
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("tern-faultfs".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(FaultFs {
            faults,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// From now on, writes and syncs of the file `name` fail with `errno`.
    pub fn fail(&self, name: &str, errno: i32) {
        *self
            .faults
            .failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((name.into(), errno));
    }

    /// Ends the fault: every operation works again.
    pub fn heal(&self) {
        *self
            .faults
            .failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Operations failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::Relaxed)
    }

    /// Where the file system is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl std::fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFs")
            .field("mountpoint", &self.mountpoint)
            .field("injected", &self.injected())
            .finish()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Inode numbers of the names in the one directory (1 is the directory itself).
#[derive(Default)]
struct Inodes {
    by_name: HashMap<OsString, u64>,
    by_ino: HashMap<u64, OsString>,
    last: u64,
}

impl Inodes {
    fn ino(&mut self, name: &OsStr) -> u64 {
        if let Some(i) = self.by_name.get(name) {
            return *i;
        }
        self.last = self.last.max(1) + 1;
        self.by_name.insert(name.to_os_string(), self.last);
        self.by_ino.insert(self.last, name.to_os_string());
        self.last
    }

    fn name(&self, ino: u64) -> Option<OsString> {
        self.by_ino.get(&ino).cloned()
    }

    fn forget(&mut self, name: &OsStr) {
        if let Some(i) = self.by_name.remove(name) {
            self.by_ino.remove(&i);
        }
    }

    fn rename(&mut self, from: &OsStr, to: &OsStr) {
        self.forget(to);
        if let Some(i) = self.by_name.remove(from) {
            self.by_name.insert(to.to_os_string(), i);
            self.by_ino.insert(i, to.to_os_string());
        }
    }
}

struct PassThrough {
    backing: PathBuf,
    faults: Arc<Faults>,
    inodes: Mutex<Inodes>,
    /// Open file handles: the backing file and the inode it was opened as.
    open: Mutex<HashMap<u64, (Arc<File>, u64)>>,
    next_fh: AtomicU64,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind: if m.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        flags: 0,
        blksize: m.blksize() as u32,
    }
}

impl PassThrough {
    fn lock_inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backing path and name of a file inode (None for the directory or a stale one).
    fn path_of(&self, ino: INodeNo) -> Option<(PathBuf, OsString)> {
        let name = self.lock_inodes().name(ino.0)?;
        Some((self.backing.join(&name), name))
    }

    fn file(&self, fh: FileHandle) -> Option<(Arc<File>, u64)> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh.0)
            .cloned()
    }

    fn add_handle(&self, f: File, ino: u64) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, (Arc::new(f), ino));
        FileHandle(fh)
    }

    /// The errno to fail a write or sync of inode `ino` with, if its file is failing.
    fn fault(&self, ino: u64) -> Option<Errno> {
        let name = self.lock_inodes().name(ino)?;
        self.faults.check(&name)
    }

    fn plain_name(name: &OsStr) -> Result<(), Errno> {
        let b = name.as_encoded_bytes();
        if b.is_empty() || b.contains(&b'/') || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }
}

impl Filesystem for PassThrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || Self::plain_name(name).is_err() {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::symlink_metadata(self.backing.join(name)) {
            Ok(m) if m.is_file() => {
                let ino = self.lock_inodes().ino(name);
                reply.entry(&TTL, &attr(ino, &m), Generation(0));
            }
            Ok(_) => reply.error(Errno::EACCES),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = if ino == INodeNo::ROOT {
            std::fs::metadata(&self.backing)
        } else {
            match self.path_of(ino) {
                Some((p, _)) => std::fs::symlink_metadata(p),
                None => return reply.error(Errno::ENOENT),
            }
        };
        match m {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some((path, _)) = self.path_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(size) = size {
            if let Some(e) = self.fault(ino.0) {
                return reply.error(e);
            }
            let r = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(size));
            if let Err(e) = r {
                return reply.error(errno(&e));
            }
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            let perm = std::fs::Permissions::from_mode(mode & 0o7777);
            if let Err(e) = std::fs::set_permissions(&path, perm) {
                return reply.error(errno(&e));
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent != INodeNo::ROOT || Self::plain_name(name).is_err() {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::remove_file(self.backing.join(name)) {
            Ok(()) => {
                self.lock_inodes().forget(name);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent != INodeNo::ROOT
            || newparent != INodeNo::ROOT
            || Self::plain_name(name).is_err()
            || Self::plain_name(newname).is_err()
        {
            return reply.error(Errno::EINVAL);
        }
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        match std::fs::rename(self.backing.join(name), self.backing.join(newname)) {
            Ok(()) => {
                self.lock_inodes().rename(name, newname);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some((path, _)) = self.path_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let acc = flags.0 & libc::O_ACCMODE;
        let r = OpenOptions::new()
            .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
            .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
            .open(&path);
        match r {
            Ok(f) => reply.opened(self.add_handle(f, ino.0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT || Self::plain_name(name).is_err() {
            return reply.error(Errno::EINVAL);
        }
        let path = self.backing.join(name);
        let acc = flags & libc::O_ACCMODE;
        let r = OpenOptions::new()
            .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
            .write(true)
            .create(true)
            .custom_flags(flags & libc::O_EXCL)
            .mode(mode & !umask & 0o7777)
            .open(&path)
            .and_then(|f| f.metadata().map(|m| (f, m)));
        match r {
            Ok((f, m)) => {
                let ino = self.lock_inodes().ino(name);
                let fh = self.add_handle(f, ino);
                reply.created(&TTL, &attr(ino, &m), Generation(0), fh, FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((f, _)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((f, ino)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        if let Some(e) = self.fault(ino) {
            return reply.error(e);
        }
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((f, ino)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        if let Some(e) = self.fault(ino) {
            return reply.error(e);
        }
        let r = if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names: Vec<OsString> = match std::fs::read_dir(&self.backing) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name())
                .collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        names.sort();
        let mut entries = vec![
            (1, FileType::Directory, OsString::from(".")),
            (1, FileType::Directory, OsString::from("..")),
        ];
        {
            let mut inodes = self.lock_inodes();
            for n in names {
                entries.push((inodes.ino(&n), FileType::RegularFile, n));
            }
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match File::open(&self.backing).and_then(|d| d.sync_all()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c =
            std::ffi::CString::new(self.backing.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs is plain old data; all zeros is a valid value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and s a properly sized out-parameter.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(errno(&io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn dirs(tag: &str) -> (PathBuf, PathBuf) {
        let d = std::env::temp_dir().join(format!("tern-faultfs-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let (b, m) = (d.join("backing"), d.join("mnt"));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        (b, m)
    }

    /// Files pass through; a failing file's writes and syncs fail with the chosen errno
    /// (and reach nothing), another file's keep working; healed, all work again.
    #[test]
    fn a_chosen_file_fails_its_writes_and_syncs_on_demand() {
        if !is_root() || !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: needs root and /dev/fuse");
            return;
        }
        let (b, m) = dirs("basic");
        let fs = FaultFs::mount(&b, &m).unwrap();
        let vol = m.join("vol.img");
        std::fs::write(&vol, vec![1u8; 8192]).unwrap();
        std::fs::write(m.join("log"), b"hello").unwrap();
        assert_eq!(std::fs::read(b.join("vol.img")).unwrap(), vec![1u8; 8192]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&vol)
            .unwrap();
        fs.fail("vol.img", libc::EIO);
        let e = f.write_all_at(&[9u8; 512], 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        // Another file is unaffected, and the failed write reached nothing.
        std::fs::write(m.join("log"), b"still fine").unwrap();
        assert_eq!(std::fs::read(b.join("log")).unwrap(), b"still fine");
        assert_eq!(std::fs::read(b.join("vol.img")).unwrap()[4096], 1);
        fs.fail("vol.img", libc::ENOSPC);
        let e = f.write_all_at(&[9u8; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(fs.injected() >= 3);
        fs.heal();
        f.write_all_at(&[9u8; 512], 4096).unwrap();
        f.sync_data().unwrap();
        assert_eq!(std::fs::read(b.join("vol.img")).unwrap()[4096], 9);
        // Rename over, unlink, list.
        std::fs::write(m.join("new.tmp"), b"new").unwrap();
        std::fs::rename(m.join("new.tmp"), m.join("log")).unwrap();
        assert_eq!(std::fs::read(m.join("log")).unwrap(), b"new");
        let mut names: Vec<_> = std::fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["log", "vol.img"]);
        std::fs::remove_file(m.join("log")).unwrap();
        assert!(!b.join("log").exists());
        drop(f);
        drop(fs);
        // Unmounted: the mount point is an empty directory again.
        assert_eq!(std::fs::read_dir(&m).unwrap().count(), 0);
    }
}
