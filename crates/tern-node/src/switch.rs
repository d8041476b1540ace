//! The site's virtual L2 switch (CloudNet's VPLS role), as a sans-IO core.
//!
//! Ports are VM NICs (QEMU `-netdev stream` over a unix socket), the site's TAP interface and
//! one port per remote site (an overlay stream of the transport). The switch learns source
//! MACs; a known unicast destination goes to its port, anything else floods. Split horizon: a
//! frame that came from a remote site is never flooded to another remote site, so two or more
//! sites cannot loop. After a live migration QEMU's self-announce (RARP from the VM's MAC)
//! re-teaches every switch where the VM now is.
//!
//! Frames on unix sockets and overlay streams are length-prefixed: `be32 len | frame`, the
//! framing of QEMU's `-netdev stream`/`socket` (no vnet header).

use std::collections::BTreeMap;

/// Largest frame accepted (jumbo frames included); longer length prefixes are errors.
pub const MAX_FRAME: usize = 9216;
/// Shortest frame that has both MAC addresses.
pub const MIN_FRAME: usize = 14;
/// Most MAC addresses learned; beyond it unknown sources are not learned (and flood).
pub const MAX_MACS: usize = 4096;

pub type Mac = [u8; 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    /// A VM NIC (id assigned by the driver).
    Vm(u64),
    /// The site's TAP interface.
    Tap,
    /// A remote site (peer index).
    Remote(usize),
}

impl Port {
    fn is_remote(self) -> bool {
        matches!(self, Port::Remote(_))
    }
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct SwitchStats {
    pub frames: u64,
    pub unicast: u64,
    pub flooded: u64,
    pub filtered: u64,
    pub runts: u64,
    pub moves: u64,
    pub macs: usize,
}

#[derive(Debug, Default)]
pub struct Switch {
    macs: BTreeMap<Mac, Port>,
    stats: SwitchStats,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// Send to exactly this port.
    One(Port),
    /// Send to every port except the ingress, and to no remote port if the ingress is remote.
    Flood,
    Drop,
}

impl Switch {
    pub fn new() -> Switch {
        Switch::default()
    }

    pub fn stats(&self) -> SwitchStats {
        SwitchStats {
            macs: self.macs.len(),
            ..self.stats.clone()
        }
    }

    pub fn lookup(&self, mac: &Mac) -> Option<Port> {
        self.macs.get(mac).copied()
    }

    /// Learns the frame's source and decides where it goes.
    pub fn handle_frame(&mut self, ingress: Port, frame: &[u8]) -> Forward {
        if frame.len() < MIN_FRAME {
            self.stats.runts += 1;
            return Forward::Drop;
        }
        self.stats.frames += 1;
        let dst: Mac = frame[0..6].try_into().expect("length checked");
        let src: Mac = frame[6..12].try_into().expect("length checked");
        if src[0] & 1 == 0 {
            let full = self.macs.len() >= MAX_MACS;
            match self.macs.get_mut(&src) {
                Some(p) if *p != ingress => {
                    *p = ingress;
                    self.stats.moves += 1;
                }
                Some(_) => {}
                None if !full => {
                    self.macs.insert(src, ingress);
                }
                None => {}
            }
        }
        if dst[0] & 1 == 0
            && let Some(&p) = self.macs.get(&dst)
        {
            if p == ingress || (ingress.is_remote() && p.is_remote()) {
                self.stats.filtered += 1;
                return Forward::Drop;
            }
            self.stats.unicast += 1;
            return Forward::One(p);
        }
        self.stats.flooded += 1;
        Forward::Flood
    }

    /// Whether a flood that entered at `ingress` goes out of `port`.
    pub fn floods_to(ingress: Port, port: Port) -> bool {
        port != ingress && !(ingress.is_remote() && port.is_remote())
    }

    /// Forgets every MAC learned on a port that went away.
    pub fn remove_port(&mut self, port: Port) {
        self.macs.retain(|_, p| *p != port);
    }
}

/// Incremental decoder of `be32 len | frame` framing.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame length {0} exceeds {MAX_FRAME}")]
pub struct FrameTooLong(pub usize);

impl FrameDecoder {
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameTooLong> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(FrameTooLong(len));
        }
        if rest.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let start = self.pos + 4;
        self.pos = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

pub fn encode_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0u8; 46]);
        f
    }
    const BCAST: Mac = [0xff; 6];
    const VM: Mac = [0x52, 0x54, 0, 1, 2, 3];
    const HOST: Mac = [0x02, 0, 0, 0, 0, 1];

    #[test]
    fn learns_floods_and_forwards() {
        let mut s = Switch::new();
        assert_eq!(
            s.handle_frame(Port::Vm(1), &frame(BCAST, VM)),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM), Some(Port::Vm(1)));
        // Unknown unicast floods; the reply is then unicast.
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(VM, HOST)),
            Forward::One(Port::Vm(1))
        );
        assert_eq!(
            s.handle_frame(Port::Vm(1), &frame(HOST, VM)),
            Forward::One(Port::Tap)
        );
        // A frame for a MAC on the ingress port is filtered.
        assert_eq!(s.handle_frame(Port::Tap, &frame(HOST, HOST)), Forward::Drop);
        assert_eq!(s.handle_frame(Port::Tap, &[0u8; 10]), Forward::Drop);
        assert_eq!(s.stats().runts, 1);
    }

    #[test]
    fn migration_announce_moves_the_mac() {
        let mut s = Switch::new();
        s.handle_frame(Port::Vm(1), &frame(BCAST, VM));
        s.handle_frame(Port::Tap, &frame(VM, HOST));
        // The VM now speaks from the remote site (self-announce arrives over the overlay).
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(BCAST, VM)),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM), Some(Port::Remote(0)));
        assert_eq!(s.stats().moves, 1);
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(VM, HOST)),
            Forward::One(Port::Remote(0))
        );
        // The old port closing does not forget the moved MAC.
        s.remove_port(Port::Vm(1));
        assert_eq!(s.lookup(&VM), Some(Port::Remote(0)));
        s.remove_port(Port::Remote(0));
        assert_eq!(s.lookup(&VM), None);
    }

    #[test]
    fn split_horizon() {
        assert!(!Switch::floods_to(Port::Remote(0), Port::Remote(1)));
        assert!(!Switch::floods_to(Port::Remote(0), Port::Remote(0)));
        assert!(Switch::floods_to(Port::Remote(0), Port::Tap));
        assert!(Switch::floods_to(Port::Vm(2), Port::Remote(1)));
        assert!(!Switch::floods_to(Port::Vm(2), Port::Vm(2)));
        let mut s = Switch::new();
        s.handle_frame(Port::Remote(1), &frame(BCAST, VM));
        // Remote-to-remote unicast is never relayed.
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(VM, HOST)),
            Forward::Drop
        );
    }

    #[test]
    fn frame_decoder_is_incremental_and_bounded() {
        let mut wire = Vec::new();
        let frames: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 14 + i * 37]).collect();
        for f in &frames {
            encode_frame(f, &mut wire);
        }
        for step in [1, 3, 7, 100, wire.len()] {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "step {step}");
            assert_eq!(d.buffered(), 0);
        }
        let mut d = FrameDecoder::default();
        d.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameTooLong(MAX_FRAME + 1)));
    }
}
