//! The open header: the first bytes of every stream a node opens, naming what the far node
//! must connect the stream to.
//!
//! ```text
//! 'T' | version 1 | kind | kind-specific body
//!   kind 1 TCP      : 4 | IPv4 address (4) | port (2)          = 10 bytes in all
//!   kind 2 unix     : len (1) | relative path (len, 1..=255)     e.g. "vm1/b/incoming.sock"
//!   kind 3 overlay  : 0                                          (L2 frames follow)
//!   kind 4 codec    : codec (1) | len (1) | relative path        migration re-encoded by
//!                                                                tern-codec (options byte)
//!   kind 5 agent    : 0                                          agent request frames
//!                                                                follow (`agent.rs`)
//! ```
//! Kind 2 carries a live-migration stream to a QEMU `-incoming` socket; the path is relative
//! to the receiving node's `migration.target_dir` and may not climb out of it. The decoder is
//! incremental: `Ok(None)` means "need more bytes", never an error.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Longest header: kind 4 with a 255-byte path.
pub const MAX_HEADER_LEN: usize = 5 + 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenHeader {
    /// Connect to this TCP address (a terminated connection).
    Tcp(SocketAddrV4),
    /// Connect to this unix socket under the migration target directory; `codec` is the
    /// tern-codec options byte (0: bytes as they are).
    Unix { path: String, codec: u8 },
    /// This stream carries overlay frames from the opening node.
    Overlay,
    /// This stream carries one request to the site agent (`agent.rs`) and its reply.
    Agent,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic or version {0:#04x} {1:#04x}")]
    Magic(u8, u8),
    #[error("unknown stream kind {0}")]
    Kind(u8),
    #[error("bad address family {0}")]
    Family(u8),
    #[error("bad overlay header length {0}")]
    OverlayLen(u8),
    #[error("bad agent header length {0}")]
    AgentLen(u8),
    #[error("unsafe unix path {0:?}")]
    Path(String),
    #[error("unknown codec options {0:#04x}")]
    Codec(u8),
}

/// A relative path with only plain components (`[A-Za-z0-9._-]`, not starting with `.`).
pub fn safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 255
        && p.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        })
}

impl OpenHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[b'T', 1]);
        match self {
            OpenHeader::Tcp(a) => {
                out.extend_from_slice(&[1, 4]);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            OpenHeader::Unix { path, codec } => {
                assert!(safe_relative_path(path), "callers validate paths");
                if *codec == 0 {
                    out.extend_from_slice(&[2, path.len() as u8]);
                } else {
                    out.extend_from_slice(&[4, *codec, path.len() as u8]);
                }
                out.extend_from_slice(path.as_bytes());
            }
            OpenHeader::Overlay => out.extend_from_slice(&[3, 0]),
            OpenHeader::Agent => out.extend_from_slice(&[5, 0]),
        }
    }

    /// Decodes a header from the start of `buf`: `Ok(Some((header, consumed)))`, or
    /// `Ok(None)` while incomplete.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenHeader, usize)>, HeaderError> {
        if buf.len() >= 2 && (buf[0] != b'T' || buf[1] != 1) {
            return Err(HeaderError::Magic(buf[0], buf[1]));
        }
        if buf.len() < 4 {
            return Ok(None);
        }
        match buf[2] {
            1 => {
                if buf[3] != 4 {
                    return Err(HeaderError::Family(buf[3]));
                }
                if buf.len() < 10 {
                    return Ok(None);
                }
                let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
                let port = u16::from_be_bytes([buf[8], buf[9]]);
                Ok(Some((OpenHeader::Tcp(SocketAddrV4::new(ip, port)), 10)))
            }
            2 | 4 => {
                let (codec, at) = if buf[2] == 2 { (0, 3) } else { (buf[3], 4) };
                if buf[2] == 4 && (codec == 0 || tern_codec::Options::from_byte(codec).is_none()) {
                    return Err(HeaderError::Codec(codec));
                }
                let Some(&len) = buf.get(at) else {
                    return Ok(None);
                };
                let end = at + 1 + len as usize;
                if buf.len() < end {
                    return Ok(None);
                }
                let path = String::from_utf8_lossy(&buf[at + 1..end]).into_owned();
                if !safe_relative_path(&path) {
                    return Err(HeaderError::Path(path));
                }
                Ok(Some((OpenHeader::Unix { path, codec }, end)))
            }
            3 if buf[3] == 0 => Ok(Some((OpenHeader::Overlay, 4))),
            3 => Err(HeaderError::OverlayLen(buf[3])),
            5 if buf[3] == 0 => Ok(Some((OpenHeader::Agent, 4))),
            5 => Err(HeaderError::AgentLen(buf[3])),
            k => Err(HeaderError::Kind(k)),
        }
    }
}

/// The local request `tern migrate` sends to its site node's migration socket:
/// `'M' | 2 | codec | len | peer name | len | path relative to the far node's target_dir`
/// (version 1 had no codec byte and is still read). The node answers one byte, 0 = stream
/// open, else an error line follows.
pub fn encode_migration_request(peer: &str, target: &str, codec: u8) -> Vec<u8> {
    assert!(peer.len() <= 255 && target.len() <= 255);
    let mut b = vec![b'M', 2, codec, peer.len() as u8];
    b.extend_from_slice(peer.as_bytes());
    b.push(target.len() as u8);
    b.extend_from_slice(target.as_bytes());
    b
}

/// Opens a relayed stream through the site node whose migration socket is `socket`: the far
/// node `peer` connects it to `target` (relative to its migration directory), re-encoded with
/// tern-codec options `codec` (0: bytes as they are, both ways). Returns the connected socket.
pub fn connect_relay(
    socket: &std::path::Path,
    peer: &str,
    target: &str,
    codec: u8,
) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect to node migration socket {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(&encode_migration_request(peer, target, codec))
        .map_err(|e| format!("send relay request: {e}"))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(|e| format!("node did not answer the relay request: {e}"))?;
    if b[0] != 0 {
        let mut msg = String::new();
        let _ = s.read_to_string(&mut msg);
        return Err(format!("node refused the stream: {}", msg.trim()));
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

/// A migration request as the node reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRequest {
    pub peer: String,
    /// Relative to the far node's target_dir, checked with [`safe_relative_path`].
    pub path: String,
    /// tern-codec options byte, 0 for none.
    pub codec: u8,
}

/// Longest migration request: magic, version, codec, two length-prefixed fields.
pub const MAX_MIGRATION_REQUEST: usize = 3 + 2 * 256;

/// Decodes a migration request from the start of `buf`: `Ok(Some((request, consumed)))`, or
/// `Ok(None)` while incomplete (the node reads requests without blocking).
pub fn decode_migration_request(buf: &[u8]) -> Result<Option<(MigrationRequest, usize)>, String> {
    let Some(&magic) = buf.first() else {
        return Ok(None);
    };
    if magic != b'M' {
        return Err("bad request magic (expected 'M')".into());
    }
    let Some(&version) = buf.get(1) else {
        return Ok(None);
    };
    let (codec, mut at) = match version {
        1 => (0, 2),
        2 => match buf.get(2) {
            Some(&c) => (c, 3),
            None => return Ok(None),
        },
        v => return Err(format!("unknown request version {v}")),
    };
    if tern_codec::Options::from_byte(codec).is_none() {
        return Err(format!("unknown codec options {codec:#04x}"));
    }
    let mut fields = Vec::with_capacity(2);
    for what in ["peer name", "path"] {
        let Some(&len) = buf.get(at) else {
            return Ok(None);
        };
        let end = at + 1 + len as usize;
        let Some(v) = buf.get(at + 1..end) else {
            return Ok(None);
        };
        fields.push(String::from_utf8(v.to_vec()).map_err(|_| format!("{what} is not UTF-8"))?);
        at = end;
    }
    let path = fields.pop().expect("two fields");
    let peer = fields.pop().expect("two fields");
    if !safe_relative_path(&path) {
        return Err(format!("unsafe target path {path:?}"));
    }
    Ok(Some((MigrationRequest { peer, path, codec }, at)))
}

/// Reads a migration request.
pub fn read_migration_request(r: &mut impl std::io::Read) -> Result<MigrationRequest, String> {
    let byte = |r: &mut dyn std::io::Read, what: &str| -> Result<u8, String> {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|e| format!("reading {what}: {e}"))?;
        Ok(b[0])
    };
    if byte(r, "magic")? != b'M' {
        return Err("bad request magic (expected 'M')".into());
    }
    let codec = match byte(r, "version")? {
        1 => 0,
        2 => byte(r, "codec")?,
        v => return Err(format!("unknown request version {v}")),
    };
    if tern_codec::Options::from_byte(codec).is_none() {
        return Err(format!("unknown codec options {codec:#04x}"));
    }
    let mut field = |what: &str| -> Result<String, String> {
        let len = byte(r, what)?;
        let mut v = vec![0u8; len as usize];
        r.read_exact(&mut v)
            .map_err(|e| format!("reading {what}: {e}"))?;
        String::from_utf8(v).map_err(|_| format!("{what} is not UTF-8"))
    };
    let peer = field("peer name")?;
    let path = field("path")?;
    if !safe_relative_path(&path) {
        return Err(format!("unsafe target path {path:?}"));
    }
    Ok(MigrationRequest { peer, path, codec })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_request_decodes_incrementally_like_the_blocking_reader() {
        let req = encode_migration_request("site-b", "vm1/b/incoming.sock", 7);
        for cut in 0..req.len() {
            assert_eq!(decode_migration_request(&req[..cut]), Ok(None), "cut {cut}");
        }
        let (r, used) = decode_migration_request(&req).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(r, read_migration_request(&mut &req[..]).unwrap());
        assert!(decode_migration_request(b"X").is_err());
        assert!(decode_migration_request(b"M\x09").is_err());
        assert!(decode_migration_request(b"M\x02\x07\x01b\x05../xx").is_err());
    }

    #[test]
    fn golden_bytes() {
        let mut b = Vec::new();
        OpenHeader::Tcp("198.18.2.1:5201".parse().unwrap()).encode(&mut b);
        assert_eq!(b, [b'T', 1, 1, 4, 198, 18, 2, 1, 0x14, 0x51]);
        b.clear();
        OpenHeader::Unix {
            path: "vm1/b/in.sock".into(),
            codec: 0,
        }
        .encode(&mut b);
        assert_eq!(&b[..4], &[b'T', 1, 2, 13]);
        assert_eq!(&b[4..], b"vm1/b/in.sock");
        b.clear();
        OpenHeader::Unix {
            path: "vm1/b/in.sock".into(),
            codec: 7,
        }
        .encode(&mut b);
        assert_eq!(&b[..5], &[b'T', 1, 4, 7, 13]);
        assert!(matches!(
            OpenHeader::decode(b"T\x01\x04\x10\x01a"),
            Err(HeaderError::Codec(0x10))
        ));
        b.clear();
        OpenHeader::Overlay.encode(&mut b);
        assert_eq!(b, [b'T', 1, 3, 0]);
        b.clear();
        OpenHeader::Agent.encode(&mut b);
        assert_eq!(b, [b'T', 1, 5, 0]);
        assert_eq!(
            OpenHeader::decode(b"T\x01\x05\x01"),
            Err(HeaderError::AgentLen(1))
        );
    }

    #[test]
    fn round_trip_and_incremental() {
        for h in [
            OpenHeader::Tcp("10.0.0.1:80".parse().unwrap()),
            OpenHeader::Unix {
                path: "a/b-c_d.sock".into(),
                codec: 0,
            },
            OpenHeader::Unix {
                path: "a/b-c_d.sock".into(),
                codec: 3,
            },
            OpenHeader::Overlay,
            OpenHeader::Agent,
        ] {
            let mut b = Vec::new();
            h.encode(&mut b);
            b.extend_from_slice(b"payload");
            let n = b.len() - 7;
            for cut in 0..n {
                assert_eq!(OpenHeader::decode(&b[..cut]), Ok(None), "{h:?} cut {cut}");
            }
            assert_eq!(OpenHeader::decode(&b), Ok(Some((h, n))));
        }
    }

    #[test]
    fn migration_request_golden_round_trip_and_errors() {
        let req = encode_migration_request("site-b", "vm1/b/in.sock", 7);
        assert_eq!(req, b"M\x02\x07\x06site-b\x0dvm1/b/in.sock".to_vec());
        let want = MigrationRequest {
            peer: "site-b".into(),
            path: "vm1/b/in.sock".into(),
            codec: 7,
        };
        assert_eq!(read_migration_request(&mut &req[..]), Ok(want.clone()));
        let v1 = b"M\x01\x06site-b\x0dvm1/b/in.sock";
        assert_eq!(
            read_migration_request(&mut &v1[..]),
            Ok(MigrationRequest { codec: 0, ..want })
        );
        assert!(read_migration_request(&mut &b"M\x02\x08"[..]).is_err());
        let bad = encode_migration_request("site-b", "../etc", 0);
        assert!(
            read_migration_request(&mut &bad[..])
                .unwrap_err()
                .contains("unsafe")
        );
        assert!(
            read_migration_request(&mut &req[..6])
                .unwrap_err()
                .contains("peer name")
        );
        assert!(read_migration_request(&mut &b"X\x01"[..]).is_err());
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(
            OpenHeader::decode(b"X\x01"),
            Err(HeaderError::Magic(..))
        ));
        assert!(matches!(
            OpenHeader::decode(b"T\x01\x09\x00"),
            Err(HeaderError::Kind(9))
        ));
        assert!(matches!(
            OpenHeader::decode(b"T\x01\x01\x06"),
            Err(HeaderError::Family(6))
        ));
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "/abs",
            "a//b",
            ".hidden",
            "a b",
            "",
        ] {
            let mut b = vec![b'T', 1, 2, bad.len() as u8];
            b.extend_from_slice(bad.as_bytes());
            assert!(
                matches!(OpenHeader::decode(&b), Err(HeaderError::Path(_))),
                "{bad}"
            );
        }
    }
}
