//! Opening a migration stream through the site node (request format:
//! `tern_node::open::encode_migration_request`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Opens a migration stream through the node at `socket` to `target` (relative to the far
/// node's migration directory) at `peer`, re-encoded with `codec`; returns the connected
/// socket for QEMU.
pub fn open(
    socket: &Path,
    peer: &str,
    target: &str,
    codec: tern_codec::Options,
) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connect to node migration socket {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(&tern_node::open::encode_migration_request(
        peer,
        target,
        codec.to_byte(),
    ))
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
