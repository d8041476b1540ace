//! The site's virtual L2 switch (CloudNet's VPLS role), as a sans-IO core.
//!
//! Ports are VM NICs (QEMU `-netdev stream` over a unix socket), the site's TAP interface and
//! one port per remote site (an overlay stream of the transport). The switch learns source
//! MACs; a known unicast destination goes to its port, anything else floods. Split horizon: a
//! frame that came from a remote site is never flooded to another remote site, so two or more
//! sites cannot loop. After a live migration QEMU's self-announce (RARP from the VM's MAC)
//! re-teaches every switch where the VM now is.
//!
//! Port security (docs/migration.md, "MACs and ports"):
//! - A VM port is *bound* to the first unicast MAC it sources (at most
//!   [`MAX_VM_PORT_MACS`]); it may source only its bound MAC(s) (else the frame is dropped,
//!   `spoofed`). While bound, that MAC is never relearned on another port: a frame sourcing it
//!   elsewhere is dropped (`hijacks`). Detaching the port releases the binding, so a
//!   migrated VM's announce can then move the MAC to the overlay port.
//! - Learned (unbound) entries of the TAP and remote ports age out after [`AGEING_NS`]
//!   without a frame from them; the table holds at most [`MAX_MACS`].
//! - A *gated* port (the disk server's output gate, `tern-disk/src/nic.rs`) announces itself
//!   with a marked hello naming the only MAC it may bind. That MAC is then reserved: no plain
//!   VM port may bind it, and one that had bound it first loses it (`reclaimed`), so a VM
//!   squatting on a protected VM's MAC can neither block nor impersonate it. Frames to a
//!   gated port are marked
//!   when their source is a gated port bound to the source MAC (the only frames whose clock
//!   trailer the gate takes in); marked frames from a gated port are group-internal and go
//!   only to the gated port bound to their destination, never flooded.
//!
//! Frames on unix sockets and overlay streams are length-prefixed: `be32 len | frame`, the
//! framing of QEMU's `-netdev stream`/`socket` (no vnet header). On VM ports bit 31 of the
//! length ([`MARK`]) is a tern mark (QEMU never sets it): hello / group-internal from a gate,
//! trusted source towards a gate. Overlay streams never carry it.

use std::collections::BTreeMap;

/// Largest frame accepted (jumbo frames included); longer length prefixes are errors.
pub const MAX_FRAME: usize = 9216;
/// Shortest frame that has both MAC addresses.
pub const MIN_FRAME: usize = 14;
/// Most MAC addresses in the table; when full, expired entries are purged, and if none
/// expired an unknown source is not learned (frames to it flood; counted `table_full`).
pub const MAX_MACS: usize = 4096;
/// Most MACs one VM port may bind (source); frames from further MACs are dropped (`spoofed`).
pub const MAX_VM_PORT_MACS: usize = 1;
/// A learned (unbound) entry not refreshed by a frame for this long is forgotten (300 s, the
/// Linux bridge default ageing time).
pub const AGEING_NS: u64 = 300_000_000_000;
/// Least time between two scans of a full table for aged entries (a source flood must not
/// make every frame walk the table).
pub const AGE_SCAN_NS: u64 = 1_000_000_000;
/// Bit 31 of a VM port's length prefix: a tern mark ([`FrameDecoder::next_marked`]).
pub const MARK: u32 = 1 << 31;
/// Ethertype of a gate's hello frame (IEEE local experimental); its source is the gated VM's
/// MAC. Only meaningful as the first, marked frame of a VM port.
pub const HELLO_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

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
#[serde(default)]
pub struct SwitchStats {
    pub frames: u64,
    pub unicast: u64,
    pub flooded: u64,
    pub filtered: u64,
    pub runts: u64,
    pub moves: u64,
    pub macs: usize,
    /// Frames sourcing a MAC bound to another port (dropped).
    pub hijacks: u64,
    /// Frames from a VM port sourcing a MAC it may not bind (dropped).
    pub spoofed: u64,
    /// Learned entries forgotten after [`AGEING_NS`].
    pub aged: u64,
    /// Sources not learned because the table was full.
    pub table_full: u64,
    /// Group-internal frames whose destination is no gated port (dropped, never flooded).
    pub internal_dropped: u64,
    /// Marked frames that were neither a first hello nor from a gated port (dropped).
    pub bad_marks: u64,
    /// Gate hellos accepted.
    pub gated: u64,
    /// A gate's hello took its VM's MAC back from a plain VM port that had bound it first.
    pub reclaimed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: Port,
    /// Bound to a VM port (never ages, never moves while the port is attached).
    bound: bool,
    seen_ns: u64,
}

/// What the switch knows of one VM port.
#[derive(Debug, Default)]
struct VmState {
    /// MACs bound to the port (at most [`MAX_VM_PORT_MACS`]).
    macs: Vec<Mac>,
    /// A gate's port: the only MAC it may bind.
    gate_mac: Option<Mac>,
    /// Whether any frame came in yet (a hello is only valid first).
    seen: bool,
}

#[derive(Debug, Default)]
pub struct Switch {
    macs: BTreeMap<Mac, Entry>,
    vms: BTreeMap<u64, VmState>,
    stats: SwitchStats,
    /// When a full table was last scanned for aged entries.
    last_age_ns: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// Send to exactly this port.
    One(Port),
    /// Send to every port except the ingress, and to no remote port if the ingress is remote.
    Flood,
    Drop,
}

fn is_unicast(m: &Mac) -> bool {
    m[0] & 1 == 0
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

    /// The port `mac` is at (bound, or learned and not aged at `now_ns`).
    pub fn lookup(&self, mac: &Mac, now_ns: u64) -> Option<Port> {
        let e = self.macs.get(mac)?;
        (e.bound || now_ns.saturating_sub(e.seen_ns) < AGEING_NS).then_some(e.port)
    }

    /// Whether `port` is a gate's port (frames to it carry the trusted-source mark).
    pub fn is_gated(&self, port: Port) -> bool {
        match port {
            Port::Vm(id) => self.vms.get(&id).is_some_and(|v| v.gate_mac.is_some()),
            _ => false,
        }
    }

    /// Whether a frame that entered at `ingress` comes from a gated port bound to its source
    /// MAC: the only frames whose clock trailer a gate may take in.
    pub fn trusted_source(&self, ingress: Port, frame: &[u8]) -> bool {
        let Port::Vm(id) = ingress else { return false };
        if frame.len() < MIN_FRAME {
            return false;
        }
        let src: Mac = frame[6..12].try_into().expect("length checked");
        self.vms
            .get(&id)
            .is_some_and(|v| v.gate_mac == Some(src) && v.macs.contains(&src))
    }

    /// Forgets learned entries not refreshed for [`AGEING_NS`] (bound entries stay).
    pub fn age(&mut self, now_ns: u64) {
        let before = self.macs.len();
        self.macs
            .retain(|_, e| e.bound || now_ns.saturating_sub(e.seen_ns) < AGEING_NS);
        self.stats.aged += (before - self.macs.len()) as u64;
    }

    /// Port security for a frame's source: binds/learns it, or refuses the frame.
    fn admit_source(&mut self, ingress: Port, src: Mac, now_ns: u64) -> bool {
        if !is_unicast(&src) {
            return true; // never learned (and never a VM's own MAC)
        }
        let existing = self.macs.get(&src).copied();
        if let Some(e) = existing
            && e.bound
            && e.port != ingress
        {
            self.stats.hijacks += 1;
            return false;
        }
        let bound = match ingress {
            Port::Vm(id) => {
                // A MAC a gate's hello named belongs to that gate's port alone.
                let reserved = self
                    .vms
                    .iter()
                    .any(|(o, v)| *o != id && v.gate_mac == Some(src));
                if reserved {
                    self.stats.spoofed += 1;
                    return false;
                }
                let v = self.vms.entry(id).or_default();
                if !v.macs.contains(&src) {
                    let allowed = match v.gate_mac {
                        Some(m) => m == src,
                        None => v.macs.len() < MAX_VM_PORT_MACS,
                    };
                    if !allowed {
                        self.stats.spoofed += 1;
                        return false;
                    }
                    v.macs.push(src);
                }
                true
            }
            Port::Tap | Port::Remote(_) => false,
        };
        match existing {
            Some(e) if e.port != ingress => self.stats.moves += 1,
            Some(_) => {}
            None if self.macs.len() >= MAX_MACS => {
                if now_ns.saturating_sub(self.last_age_ns) >= AGE_SCAN_NS {
                    self.last_age_ns = now_ns;
                    self.age(now_ns);
                }
                if self.macs.len() >= MAX_MACS {
                    self.stats.table_full += 1;
                    if !bound {
                        return true;
                    }
                    // A VM's own MAC is bound anyway (bound entries are bounded by the VM
                    // ports): the stalest learned entry makes room, if there is one.
                    let stalest = self
                        .macs
                        .iter()
                        .filter(|(_, e)| !e.bound)
                        .min_by_key(|(_, e)| e.seen_ns)
                        .map(|(m, _)| *m);
                    if let Some(m) = stalest {
                        self.macs.remove(&m);
                    }
                }
            }
            None => {}
        }
        self.macs.insert(
            src,
            Entry {
                port: ingress,
                bound,
                seen_ns: now_ns,
            },
        );
        true
    }

    /// Learns the frame's source and decides where it goes.
    pub fn handle_frame(&mut self, ingress: Port, frame: &[u8], now_ns: u64) -> Forward {
        if frame.len() < MIN_FRAME {
            self.stats.runts += 1;
            return Forward::Drop;
        }
        self.stats.frames += 1;
        let dst: Mac = frame[0..6].try_into().expect("length checked");
        let src: Mac = frame[6..12].try_into().expect("length checked");
        if let Port::Vm(id) = ingress {
            self.vms.entry(id).or_default().seen = true;
        }
        if !self.admit_source(ingress, src, now_ns) {
            return Forward::Drop;
        }
        if is_unicast(&dst)
            && let Some(p) = self.lookup(&dst, now_ns)
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

    /// A frame that came with the [`MARK`] from VM port `ingress`: the first frame of a
    /// gate's port is its hello (never forwarded); later ones from a gated port are
    /// group-internal (delivered only to the gated port bound to their destination).
    pub fn handle_marked(&mut self, ingress: Port, frame: &[u8], now_ns: u64) -> Forward {
        let Port::Vm(id) = ingress else {
            self.stats.bad_marks += 1;
            return Forward::Drop;
        };
        if frame.len() < MIN_FRAME {
            self.stats.runts += 1;
            return Forward::Drop;
        }
        let src: Mac = frame[6..12].try_into().expect("length checked");
        let v = self.vms.entry(id).or_default();
        if !v.seen {
            v.seen = true;
            if frame[12..14] != HELLO_ETHERTYPE || !is_unicast(&src) {
                self.stats.bad_marks += 1;
                return Forward::Drop;
            }
            // The MAC binds with the VM's first own frame, not now: a migration's
            // destination attaches while the VM still runs at the source.
            v.gate_mac = Some(src);
            self.stats.gated += 1;
            // A plain VM port that bound this MAC first loses it.
            if let Some(e) = self.macs.get(&src).copied()
                && e.bound
                && let Port::Vm(other) = e.port
                && other != id
                && let Some(o) = self.vms.get_mut(&other)
                && o.gate_mac != Some(src)
            {
                o.macs.retain(|m| *m != src);
                self.macs.remove(&src);
                self.stats.reclaimed += 1;
            }
            return Forward::Drop;
        }
        if v.gate_mac.is_none() {
            self.stats.bad_marks += 1;
            return Forward::Drop;
        }
        self.stats.frames += 1;
        if !self.admit_source(ingress, src, now_ns) {
            return Forward::Drop;
        }
        let dst: Mac = frame[0..6].try_into().expect("length checked");
        match self.lookup(&dst, now_ns) {
            Some(p) if p != ingress && is_unicast(&dst) && self.trusted_dst(p, dst) => {
                self.stats.unicast += 1;
                Forward::One(p)
            }
            _ => {
                self.stats.internal_dropped += 1;
                Forward::Drop
            }
        }
    }

    /// Whether `port` is a gated port bound to `mac`.
    fn trusted_dst(&self, port: Port, mac: Mac) -> bool {
        let Port::Vm(id) = port else { return false };
        self.vms
            .get(&id)
            .is_some_and(|v| v.gate_mac == Some(mac) && v.macs.contains(&mac))
    }

    /// Whether a flood that entered at `ingress` goes out of `port`.
    pub fn floods_to(ingress: Port, port: Port) -> bool {
        port != ingress && !(ingress.is_remote() && port.is_remote())
    }

    /// A port went away: forgets every MAC learned on it and releases its bindings.
    pub fn remove_port(&mut self, port: Port) {
        self.macs.retain(|_, e| e.port != port);
        if let Port::Vm(id) = port {
            self.vms.remove(&id);
        }
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

    /// The next complete frame, if any. A marked length is an error here (streams that
    /// carry no marks).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameTooLong> {
        match self.next_raw(false)? {
            Some((_, f)) => Ok(Some(f)),
            None => Ok(None),
        }
    }

    /// The next complete frame and whether its length carried the [`MARK`].
    pub fn next_marked(&mut self) -> Result<Option<(bool, &[u8])>, FrameTooLong> {
        self.next_raw(true)
    }

    fn next_raw(&mut self, marks: bool) -> Result<Option<(bool, &[u8])>, FrameTooLong> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let raw = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        let marked = marks && raw & MARK != 0;
        let len = if marks { raw & !MARK } else { raw } as usize;
        if len > MAX_FRAME {
            return Err(FrameTooLong(len));
        }
        if rest.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let start = self.pos + 4;
        self.pos = start + len;
        Ok(Some((marked, &self.buf[start..start + len])))
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
    encode_marked(frame, false, out);
}

/// `be32 len | frame`, with the [`MARK`] in the length when `marked`.
pub fn encode_marked(frame: &[u8], marked: bool, out: &mut Vec<u8>) {
    let mark = if marked { MARK } else { 0 };
    out.extend_from_slice(&(frame.len() as u32 | mark).to_be_bytes());
    out.extend_from_slice(frame);
}

/// A gate's hello for a VM with MAC `mac` (send it [`encode_marked`], first).
pub fn hello_frame(mac: Mac) -> Vec<u8> {
    let mut f = vec![0u8; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&HELLO_ETHERTYPE);
    f.extend_from_slice(b"tern-gate1");
    f
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
    const VM2: Mac = [0x52, 0x54, 0, 1, 2, 4];
    const HOST: Mac = [0x02, 0, 0, 0, 0, 1];
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn learns_floods_and_forwards() {
        let mut s = Switch::new();
        assert_eq!(
            s.handle_frame(Port::Vm(1), &frame(BCAST, VM), 0),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM, 0), Some(Port::Vm(1)));
        // Unknown unicast floods; the reply is then unicast.
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(VM, HOST), 0),
            Forward::One(Port::Vm(1))
        );
        assert_eq!(
            s.handle_frame(Port::Vm(1), &frame(HOST, VM), 0),
            Forward::One(Port::Tap)
        );
        // A frame for a MAC on the ingress port is filtered.
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(HOST, HOST), 0),
            Forward::Drop
        );
        assert_eq!(s.handle_frame(Port::Tap, &[0u8; 10], 0), Forward::Drop);
        assert_eq!(s.stats().runts, 1);
    }

    /// Live migration seen from the source site: the destination's announce arrives over
    /// the overlay while the paused source VM is still attached. It must not take the MAC
    /// (the source may still be resumed if the migration fails); once the source port
    /// detaches, the announce moves it.
    #[test]
    fn migration_announce_moves_the_mac_once_the_source_detaches() {
        let mut s = Switch::new();
        s.handle_frame(Port::Vm(1), &frame(BCAST, VM), 0);
        s.handle_frame(Port::Tap, &frame(VM, HOST), 0);
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(BCAST, VM), SEC),
            Forward::Drop
        );
        assert_eq!(s.lookup(&VM, SEC), Some(Port::Vm(1)));
        assert_eq!(s.stats().hijacks, 1);
        // The source QEMU quits: its port detaches and releases the MAC.
        s.remove_port(Port::Vm(1));
        assert_eq!(s.lookup(&VM, SEC), None);
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(BCAST, VM), 2 * SEC),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM, 2 * SEC), Some(Port::Remote(0)));
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(VM, HOST), 2 * SEC),
            Forward::One(Port::Remote(0))
        );
        s.remove_port(Port::Remote(0));
        assert_eq!(s.lookup(&VM, 2 * SEC), None);
    }

    /// Seen from the destination site: the VM's MAC is learned on the overlay port; the
    /// destination VM's first frame (its announce) binds it to the new local port.
    #[test]
    fn an_arriving_vm_takes_its_mac_from_the_overlay() {
        let mut s = Switch::new();
        s.handle_frame(Port::Remote(0), &frame(BCAST, VM), 0);
        assert_eq!(s.lookup(&VM, 0), Some(Port::Remote(0)));
        assert_eq!(
            s.handle_frame(Port::Vm(7), &frame(BCAST, VM), SEC),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM, SEC), Some(Port::Vm(7)));
        assert_eq!(s.stats().moves, 1);
        // Bound now: the old site's late frames do not take it back.
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(BCAST, VM), SEC),
            Forward::Drop
        );
        assert_eq!(s.lookup(&VM, SEC), Some(Port::Vm(7)));
    }

    #[test]
    fn a_bound_mac_is_not_hijacked_and_a_vm_port_sources_only_its_own() {
        let mut s = Switch::new();
        s.handle_frame(Port::Vm(1), &frame(BCAST, VM), 0);
        s.handle_frame(Port::Vm(2), &frame(BCAST, VM2), 0);
        // VM 2 (and the TAP) claim VM 1's MAC: dropped, the table keeps VM 1's port.
        for ingress in [Port::Vm(2), Port::Tap, Port::Remote(3)] {
            assert_eq!(
                s.handle_frame(ingress, &frame(HOST, VM), 0),
                Forward::Drop,
                "{ingress:?}"
            );
        }
        assert_eq!(s.lookup(&VM, 0), Some(Port::Vm(1)));
        assert_eq!(s.stats().hijacks, 3);
        // VM 2 sourcing any other MAC than its own: dropped and not learned.
        assert_eq!(
            s.handle_frame(Port::Vm(2), &frame(BCAST, HOST), 0),
            Forward::Drop
        );
        assert_eq!(s.lookup(&HOST, 0), None);
        assert_eq!(s.stats().spoofed, 1);
        // Unicast to VM 1 still goes to VM 1.
        assert_eq!(
            s.handle_frame(Port::Tap, &frame(VM, HOST), 0),
            Forward::One(Port::Vm(1))
        );
    }

    #[test]
    fn learned_entries_age_bound_ones_do_not() {
        let mut s = Switch::new();
        s.handle_frame(Port::Tap, &frame(BCAST, HOST), 0);
        s.handle_frame(Port::Vm(1), &frame(BCAST, VM), 0);
        assert_eq!(s.lookup(&HOST, AGEING_NS - 1), Some(Port::Tap));
        // Unknown again after the ageing time: frames to it flood.
        assert_eq!(s.lookup(&HOST, AGEING_NS), None);
        assert_eq!(
            s.handle_frame(Port::Vm(1), &frame(HOST, VM), AGEING_NS),
            Forward::Flood
        );
        assert_eq!(s.lookup(&VM, 10 * AGEING_NS), Some(Port::Vm(1)));
        s.age(AGEING_NS);
        assert_eq!(s.stats().aged, 1);
        assert_eq!(s.stats().macs, 1);
        // A frame refreshes an entry.
        s.handle_frame(Port::Tap, &frame(BCAST, HOST), AGEING_NS);
        s.handle_frame(Port::Tap, &frame(BCAST, HOST), 2 * AGEING_NS - 1);
        assert_eq!(s.lookup(&HOST, 3 * AGEING_NS - 2), Some(Port::Tap));
    }

    #[test]
    fn a_full_table_purges_expired_entries_first() {
        let mut s = Switch::new();
        let mac = |i: usize| -> Mac {
            let b = (i as u32).to_be_bytes();
            [0x02, 0, b[0], b[1], b[2], b[3]]
        };
        for i in 0..MAX_MACS {
            s.handle_frame(Port::Tap, &frame(BCAST, mac(i)), 0);
        }
        assert_eq!(s.stats().macs, MAX_MACS);
        s.handle_frame(Port::Tap, &frame(BCAST, mac(MAX_MACS)), 1);
        assert_eq!(s.lookup(&mac(MAX_MACS), 1), None);
        assert_eq!(s.stats().table_full, 1);
        // A VM's own MAC is bound even when full (the stalest learned entry goes).
        s.handle_frame(Port::Vm(1), &frame(BCAST, VM), 2);
        assert_eq!(s.lookup(&VM, 2), Some(Port::Vm(1)));
        assert_eq!(s.stats().macs, MAX_MACS);
        // Once the old entries aged, new sources are learned again.
        s.handle_frame(Port::Tap, &frame(BCAST, mac(MAX_MACS)), AGEING_NS);
        assert_eq!(s.lookup(&mac(MAX_MACS), AGEING_NS), Some(Port::Tap));
        assert_eq!(s.stats().macs, 2);
    }

    fn hello(s: &mut Switch, id: u64, mac: Mac) {
        assert_eq!(
            s.handle_marked(Port::Vm(id), &hello_frame(mac), 0),
            Forward::Drop
        );
    }

    #[test]
    fn only_a_gated_port_bound_to_the_source_is_trusted() {
        let (fe, db) = ([0x02, 0, 0, 0, 0, 0xfe], [0x02, 0, 0, 0, 0, 0xdb]);
        let mut s = Switch::new();
        hello(&mut s, 1, fe);
        hello(&mut s, 2, db);
        assert!(s.is_gated(Port::Vm(1)) && !s.is_gated(Port::Vm(3)));
        // Not bound before the VM's first frame (a migration's destination attaches early).
        assert_eq!(s.lookup(&db, 0), None);
        let from_db = frame(fe, db);
        assert_eq!(s.handle_frame(Port::Vm(2), &from_db, 0), Forward::Flood);
        assert!(s.trusted_source(Port::Vm(2), &from_db));
        // A plain VM port may not source a MAC a gate's hello named, even before the gated
        // VM's first frame, and is never trusted...
        let mut t = Switch::new();
        hello(&mut t, 2, db);
        assert_eq!(t.handle_frame(Port::Vm(3), &from_db, 0), Forward::Drop);
        assert!(!t.trusted_source(Port::Vm(3), &from_db));
        assert_eq!(t.lookup(&db, 0), None);
        // ... while the gate's port binds it, and cannot source another one.
        assert_eq!(t.handle_frame(Port::Vm(2), &from_db, 0), Forward::Flood);
        assert!(t.trusted_source(Port::Vm(2), &from_db));
        assert_eq!(
            t.handle_frame(Port::Vm(2), &frame(fe, HOST), 0),
            Forward::Drop
        );
        assert_eq!(t.stats().spoofed, 2);
        // A hello is only valid first, and only on a VM port: a guest cannot mark frames
        // (QEMU never sets the mark), and a late hello does not gate a port.
        assert_eq!(
            s.handle_marked(Port::Vm(1), &hello_frame(fe), 0),
            Forward::Drop
        );
        s.handle_frame(Port::Vm(4), &frame(BCAST, VM), 0);
        assert_eq!(
            s.handle_marked(Port::Vm(4), &hello_frame(VM), 0),
            Forward::Drop
        );
        assert!(!s.is_gated(Port::Vm(4)));
        assert_eq!(s.stats().bad_marks, 1);
    }

    /// A plain VM port that bound a protected VM's MAC before the VM's gate attached (a
    /// squatter: it would block the real VM's frames as hijacks and be taken for it) loses
    /// the MAC at the gate's hello; the gated VM then binds it and is trusted.
    #[test]
    fn a_gate_hello_reclaims_its_mac_from_a_squatting_plain_port() {
        let (fe, db) = ([0x02, 0, 0, 0, 0, 0xfe], [0x02, 0, 0, 0, 0, 0xdb]);
        let mut s = Switch::new();
        let from_db = frame(fe, db);
        assert_eq!(s.handle_frame(Port::Vm(3), &from_db, 0), Forward::Flood);
        assert_eq!(s.lookup(&db, 0), Some(Port::Vm(3)));
        hello(&mut s, 2, db);
        assert_eq!(s.stats().reclaimed, 1);
        assert_eq!(s.lookup(&db, 0), None);
        assert_eq!(s.handle_frame(Port::Vm(3), &from_db, 0), Forward::Drop);
        assert_eq!(s.handle_frame(Port::Vm(2), &from_db, 0), Forward::Flood);
        assert!(s.trusted_source(Port::Vm(2), &from_db));
        assert_eq!(s.lookup(&db, 0), Some(Port::Vm(2)));
        // The squatter's port may still bind a MAC of its own.
        let own = [0x02, 0, 0, 0, 0, 0x33];
        assert_eq!(
            s.handle_frame(Port::Vm(3), &frame(fe, own), 0),
            Forward::Flood
        );
        // A learned (unbound) entry elsewhere, e.g. the VM still running at another site
        // during a migration, is left alone by the hello.
        let mut m = Switch::new();
        m.handle_frame(Port::Remote(0), &from_db, 0);
        hello(&mut m, 2, db);
        assert_eq!(m.lookup(&db, 0), Some(Port::Remote(0)));
        assert_eq!(m.stats().reclaimed, 0);
    }

    /// Group-internal frames pass the output gate unheld, so they may reach only the gated
    /// port of the destination VM: never a flood, never an impostor, the TAP or a remote.
    #[test]
    fn group_internal_frames_never_flood() {
        let (fe, db) = ([0x02, 0, 0, 0, 0, 0xfe], [0x02, 0, 0, 0, 0, 0xdb]);
        let mut s = Switch::new();
        hello(&mut s, 1, fe);
        hello(&mut s, 2, db);
        s.handle_frame(Port::Vm(1), &frame(BCAST, fe), 0);
        // db not bound yet: dropped (a plain flood would hand it to everyone).
        assert_eq!(
            s.handle_marked(Port::Vm(1), &frame(db, fe), 0),
            Forward::Drop
        );
        assert_eq!(s.stats().internal_dropped, 1);
        // An impostor plain port holding db's MAC does not get it either.
        let mut t = Switch::new();
        hello(&mut t, 1, fe);
        t.handle_frame(Port::Vm(3), &frame(BCAST, db), 0);
        assert_eq!(
            t.handle_marked(Port::Vm(1), &frame(db, fe), 0),
            Forward::Drop
        );
        // Bound to db's gated port: delivered there only.
        s.handle_frame(Port::Vm(2), &frame(BCAST, db), 0);
        assert_eq!(
            s.handle_marked(Port::Vm(1), &frame(db, fe), 0),
            Forward::One(Port::Vm(2))
        );
        // Marked frames from a plain port are refused.
        assert_eq!(
            s.handle_marked(Port::Vm(3), &frame(db, VM), 0),
            Forward::Drop
        );
        s.handle_frame(Port::Vm(5), &frame(BCAST, VM2), 0);
        assert_eq!(
            s.handle_marked(Port::Vm(5), &frame(db, VM2), 0),
            Forward::Drop
        );
    }

    #[test]
    fn split_horizon() {
        assert!(!Switch::floods_to(Port::Remote(0), Port::Remote(1)));
        assert!(!Switch::floods_to(Port::Remote(0), Port::Remote(0)));
        assert!(Switch::floods_to(Port::Remote(0), Port::Tap));
        assert!(Switch::floods_to(Port::Vm(2), Port::Remote(1)));
        assert!(!Switch::floods_to(Port::Vm(2), Port::Vm(2)));
        let mut s = Switch::new();
        s.handle_frame(Port::Remote(1), &frame(BCAST, VM), 0);
        // Remote-to-remote unicast is never relayed.
        assert_eq!(
            s.handle_frame(Port::Remote(0), &frame(VM, HOST), 0),
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
        // Marks: only next_marked reads them; next_frame refuses a marked length.
        let mut wire = Vec::new();
        encode_marked(&frames[0], true, &mut wire);
        encode_marked(&frames[1], false, &mut wire);
        let mut d = FrameDecoder::default();
        d.push(&wire);
        assert_eq!(d.next_marked().unwrap(), Some((true, &frames[0][..])));
        assert_eq!(d.next_marked().unwrap(), Some((false, &frames[1][..])));
        let mut d = FrameDecoder::default();
        d.push(&wire);
        assert!(d.next_frame().is_err());
    }
}
