//! The open header: the first bytes of every stream a node opens, naming what the far node
//! must connect the stream to.
//!
//! ```text
//! 'T' | version 1 | kind | kind-specific body
//!   kind 1 TCP      : 4 | IPv4 address (4) | port (2)          = 10 bytes in all
//!   kind 2 unix     : len (1) | relative path (len, 1..=255)     e.g. "vm1/b/incoming.sock"
//!   kind 3 overlay  : 0                                          (L2 frames follow)
//! ```
//! Kind 2 carries a live-migration stream to a QEMU `-incoming` socket; the path is relative
//! to the receiving node's `migration.target_dir` and may not climb out of it. The decoder is
//! incremental: `Ok(None)` means "need more bytes", never an error.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Longest header: kind 2 with a 255-byte path.
pub const MAX_HEADER_LEN: usize = 4 + 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenHeader {
    /// Connect to this TCP address (a terminated connection).
    Tcp(SocketAddrV4),
    /// Connect to this unix socket under the migration target directory.
    Unix(String),
    /// This stream carries overlay frames from the opening node.
    Overlay,
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
    #[error("unsafe unix path {0:?}")]
    Path(String),
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
            OpenHeader::Unix(p) => {
                assert!(safe_relative_path(p), "callers validate paths");
                out.extend_from_slice(&[2, p.len() as u8]);
                out.extend_from_slice(p.as_bytes());
            }
            OpenHeader::Overlay => out.extend_from_slice(&[3, 0]),
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
            2 => {
                let len = buf[3] as usize;
                if buf.len() < 4 + len {
                    return Ok(None);
                }
                let p = String::from_utf8_lossy(&buf[4..4 + len]).into_owned();
                if !safe_relative_path(&p) {
                    return Err(HeaderError::Path(p));
                }
                Ok(Some((OpenHeader::Unix(p), 4 + len)))
            }
            3 if buf[3] == 0 => Ok(Some((OpenHeader::Overlay, 4))),
            3 => Err(HeaderError::OverlayLen(buf[3])),
            k => Err(HeaderError::Kind(k)),
        }
    }
}

/// The local request `tern migrate` sends to its site node's migration socket:
/// `'M' | 1 | len | peer name | len | path relative to the far node's target_dir`. The node
/// answers one byte, 0 = stream open, else an error line follows.
pub fn encode_migration_request(peer: &str, target: &str) -> Vec<u8> {
    assert!(peer.len() <= 255 && target.len() <= 255);
    let mut b = vec![b'M', 1, peer.len() as u8];
    b.extend_from_slice(peer.as_bytes());
    b.push(target.len() as u8);
    b.extend_from_slice(target.as_bytes());
    b
}

/// Reads a migration request: `(peer name, relative path)`, the path already checked with
/// [`safe_relative_path`].
pub fn read_migration_request(r: &mut impl std::io::Read) -> Result<(String, String), String> {
    let byte = |r: &mut dyn std::io::Read, what: &str| -> Result<u8, String> {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|e| format!("reading {what}: {e}"))?;
        Ok(b[0])
    };
    if byte(r, "magic")? != b'M' || byte(r, "version")? != 1 {
        return Err("bad request magic (expected 'M', 1)".into());
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
    Ok((peer, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let mut b = Vec::new();
        OpenHeader::Tcp("198.18.2.1:5201".parse().unwrap()).encode(&mut b);
        assert_eq!(b, [b'T', 1, 1, 4, 198, 18, 2, 1, 0x14, 0x51]);
        b.clear();
        OpenHeader::Unix("vm1/b/in.sock".into()).encode(&mut b);
        assert_eq!(&b[..4], &[b'T', 1, 2, 13]);
        assert_eq!(&b[4..], b"vm1/b/in.sock");
        b.clear();
        OpenHeader::Overlay.encode(&mut b);
        assert_eq!(b, [b'T', 1, 3, 0]);
    }

    #[test]
    fn round_trip_and_incremental() {
        for h in [
            OpenHeader::Tcp("10.0.0.1:80".parse().unwrap()),
            OpenHeader::Unix("a/b-c_d.sock".into()),
            OpenHeader::Overlay,
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
        let req = encode_migration_request("site-b", "vm1/b/in.sock");
        assert_eq!(req, b"M\x01\x06site-b\x0dvm1/b/in.sock".to_vec());
        assert_eq!(
            read_migration_request(&mut &req[..]),
            Ok(("site-b".into(), "vm1/b/in.sock".into()))
        );
        let bad = encode_migration_request("site-b", "../etc");
        assert!(
            read_migration_request(&mut &bad[..])
                .unwrap_err()
                .contains("unsafe")
        );
        assert!(
            read_migration_request(&mut &req[..5])
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
