//! Management unix sockets that do not rest on the umask: created 0600 atomically and
//! checked with `SO_PEERCRED` on accept (libvirt's rule: access control on every
//! management socket).
//!
//! [`bind_private`] binds inside a fresh 0700 directory next to the final path, sets the
//! socket's mode there (nobody else can reach it yet: `fchmod` on a socket before `bind`
//! does nothing on Linux, and changing the umask is process-wide, so racy for other
//! threads), and renames it into place: the path appears with its final mode. A connecting
//! peer must then also pass [`peer_allowed`]: uid 0, this process's effective uid, or
//! (when given) a member of the configured group.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Mode of a management socket with no group access configured.
pub const SOCKET_MODE: u32 = 0o600;

/// Binds a unix socket at `path` (replacing a stale one) with mode [`SOCKET_MODE`], or
/// 0660 and group `gid` when given.
pub fn bind_private(path: &Path, gid: Option<u32>) -> io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".bind-{}", std::process::id()));
    let tmp_dir = dir.join(tmp_name);
    let _ = std::fs::remove_dir_all(&tmp_dir);
    let c = CString::new(tmp_dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in socket path"))?;
    // SAFETY: a valid NUL-terminated path; mkdir does not keep the pointer.
    if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        let inner = tmp_dir.join(name);
        let l = UnixListener::bind(&inner)?;
        let mode = match gid {
            Some(g) => {
                std::os::unix::fs::chown(&inner, None, Some(g))?;
                0o660
            }
            None => SOCKET_MODE,
        };
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp_dir);
    result
}

/// The connecting process's credentials (pid, uid, gid).
pub fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Whether the peer of `s` may use a management socket: root, the same effective uid as
/// this process, or (with `gid`) that group. Unreadable credentials refuse.
pub fn peer_allowed(s: &UnixStream, gid: Option<u32>) -> bool {
    let Ok(c) = peer_cred(s) else { return false };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    c.uid == 0 || c.uid == me || gid.is_some_and(|g| c.gid == g)
}

/// For tests of the drivers that use these sockets (root only: it forks and setuids).
pub mod testing {
    use super::*;

    /// Connects to `path` as uid/gid 65534 in a forked child; its exit code: 0 connected
    /// and was closed without a byte, 1 connect refused (EACCES), 2 got data, 3 other.
    pub fn connect_as_nobody(path: &Path) -> i32 {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: the child only makes async-signal-safe system calls, then _exit.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    libc::_exit(3);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                    libc::_exit(if *libc::__errno_location() == libc::EACCES {
                        1
                    } else {
                        3
                    });
                }
                let mut b = [0u8; 1];
                let n = libc::read(fd, b.as_mut_ptr().cast(), 1);
                libc::_exit(if n == 0 { 0 } else { 2 });
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::WEXITSTATUS(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::connect_as_nobody;
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tern-unix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn a_management_socket_is_0600_from_the_start_and_refuses_other_uids() {
        let d = dir("mode");
        let path = d.join("ctl.sock");
        std::fs::write(&path, b"stale").unwrap();
        let l = bind_private(&path, None).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o777, SOCKET_MODE);
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()));
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporary left"
        );
        // Our own uid passes the check and is served.
        let mine = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(peer_allowed(&s, None));
        drop((mine, s));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: the other-uid half of this test needs setuid");
            return;
        }
        // Another uid: the mode refuses it at connect.
        assert_eq!(connect_as_nobody(&path), 1);
        // With the mode opened up, SO_PEERCRED still refuses it on accept.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let allowed = peer_allowed(&s, None);
            drop(s);
            allowed
        });
        assert_eq!(connect_as_nobody(&path), 0);
        assert!(!server.join().unwrap(), "uid 65534 was let in");
    }
}
