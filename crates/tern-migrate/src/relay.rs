//! The request `tern migrate` sends to its site node's migration socket (see
//! `tern-node`'s `accept_migrations`): `'M' | 1 | len | peer name | len | relative path`;
//! the node answers one byte, 0 = stream open, else an error line follows.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub fn request(peer: &str, target: &str) -> Vec<u8> {
    assert!(peer.len() <= 255 && target.len() <= 255);
    let mut b = vec![b'M', 1, peer.len() as u8];
    b.extend_from_slice(peer.as_bytes());
    b.push(target.len() as u8);
    b.extend_from_slice(target.as_bytes());
    b
}

/// Opens a migration stream through the node at `socket` to `target` (relative to the far
/// node's migration directory) at `peer`; returns the connected socket for QEMU.
pub fn open(socket: &Path, peer: &str, target: &str) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connect to node migration socket {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(&request(peer, target))
        .map_err(|e| format!("send migration request: {e}"))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(|e| format!("node did not answer the migration request: {e}"))?;
    if b[0] != 0 {
        let mut msg = String::new();
        let _ = s.read_to_string(&mut msg);
        return Err(format!("node refused the migration stream: {}", msg.trim()));
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn golden_request() {
        assert_eq!(
            super::request("site-b", "vm1/b/in.sock"),
            b"M\x01\x06site-b\x0dvm1/b/in.sock".to_vec()
        );
    }
}
