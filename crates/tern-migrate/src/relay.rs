//! Opening a migration stream through the site node (`tern_node::open::connect_relay`).

use std::os::unix::net::UnixStream;
use std::path::Path;

/// Opens a migration stream through the node at `socket` to `target` (relative to the far
/// node's migration directory) at `peer`, re-encoded with `codec`; returns the connected
/// socket for QEMU.
pub fn open(
    socket: &Path,
    peer: &str,
    target: &str,
    codec: tern_codec::Options,
) -> Result<UnixStream, String> {
    tern_node::open::connect_relay(socket, peer, target, codec.to_byte())
}
