//! The NBD server's unix socket is private from the start and refuses other users on accept
//! (issue 25, defect 11).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;

use tern_nbd::{Export, MemBackend, Server};
use tern_os::unix::{SOCKET_MODE, testing::connect_as_nobody};

#[test]
fn the_nbd_server_socket_is_private() {
    let d = std::env::temp_dir().join(format!("tern-nbd-private-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = d.join("nbd.sock");
    let be = std::sync::Arc::new(MemBackend::new(4096, false));
    let server = Server::bind_unix(&path, vec![Export::new("x", be)])
        .unwrap()
        .spawn()
        .unwrap();
    let md = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(md.mode() & 0o777, SOCKET_MODE);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        // Refused on accept: closed before the greeting.
        assert_eq!(connect_as_nobody(&path), 0);
    }
    let mut s = UnixStream::connect(&path).unwrap();
    let mut greeting = [0u8; 8];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    drop(s);
    server.stop();
    let _ = std::fs::remove_dir_all(&d);
}
