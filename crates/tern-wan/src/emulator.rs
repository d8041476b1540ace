//! The forwarding engine: one thread per direction, each owning a [`Link`] model, reading
//! packets from its input TUN device and writing them, when due, to the other device.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use tern_link::{DirectionConfig, Link, Offer};

use crate::gso::{self, VNET_HDR_LEN};
use crate::pcap::PcapWriter;
use crate::proto::{Direction, DirectionReport, DriverCounters, PROTOCOL_VERSION, StatsReply};
use crate::{WanError, sys};

/// Packets read per wake-up before deliveries are checked (bounds the time a burst can hold
/// back due packets).
const READ_BATCH: usize = 64;
/// With at most this many packets held, the thread wakes early and spins to the deadline,
/// so sparse traffic (pings, request/response) sees the configured delay to within
/// microseconds. Under load it sleeps on the timer and releases in batches instead: spinning
/// would take a core from the traffic on a 2-core machine.
const SPIN_MAX_HELD: usize = 8;
/// Under load (more than [`SPIN_MAX_HELD`] packets held) the thread wakes on this tick
/// rather than on every arriving packet or every release deadline: at 1 Gbit/s packets
/// arrive and leave every 12 µs, and a wake-up per packet (timer programming, a VM exit
/// each here) took a third of a core. Input waits in the TUN queue for at most a tick (its
/// arrival time is estimated, see [`DirLoop::read_batch`]); releases are late by at most a
/// tick.
const LOAD_TICK_NS: u64 = 50_000;
/// Longest stretch over which the arrival times of packets read after a load tick are
/// spread (a tick plus the timer's p99 overshoot here); see [`DirLoop::read_batch`].
const BLIND_MAX_NS: u64 = 500_000;
/// Bounds of the early-wake margin, which tracks the timer's measured overshoot.
const MARGIN_MIN_NS: u64 = 20_000;
const MARGIN_MAX_NS: u64 = 500_000;
/// Free packet buffers kept for reuse.
const POOL_LIMIT: usize = 4096;
/// Largest packet read from a TUN device (its MTU is set by whoever made it; 64 KiB covers
/// any MTU).
pub const MAX_PACKET_BYTES: usize = 65_535;

/// One end of the emulated link: a TUN device, optionally in a network namespace.
#[derive(Debug, Clone)]
pub struct TunSide {
    pub netns: Option<String>,
    pub dev: String,
    /// Buffer size for reads; packets larger than this are truncated by the kernel, so it
    /// must be at least the device MTU.
    pub mtu: usize,
}

#[derive(Debug, Clone)]
pub struct PcapOptions {
    pub dir: PathBuf,
    pub snaplen: u32,
    pub max_bytes_per_file: u64,
}

#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    pub a: TunSide,
    pub b: TunSide,
    pub a_to_b: DirectionConfig,
    pub b_to_a: DirectionConfig,
    pub seed: u64,
    pub pcap: Option<PcapOptions>,
    /// Write runs of consecutive TCP segments of one flow as one GSO packet (see `gso`).
    pub gso: bool,
}

enum Command {
    Report(Sender<DirectionReport>),
    Set(DirectionConfig),
    Stop,
}

struct DirHandle {
    tx: Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// A running emulator. Dropping it stops both directions.
pub struct Emulator {
    dirs: [DirHandle; 2],
    seed: u64,
    started_ns: u64,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    pub fn start(opts: EmulatorOptions) -> Result<Self, WanError> {
        opts.a_to_b.validate()?;
        opts.b_to_a.validate()?;
        let open = |s: &TunSide| {
            sys::open_tun(s.netns.as_deref(), &s.dev, opts.gso).map_err(|source| WanError::Tun {
                dev: s.dev.clone(),
                netns: s.netns.clone().unwrap_or_default(),
                source,
            })
        };
        let fd_a = Arc::new(open(&opts.a)?);
        let fd_b = Arc::new(open(&opts.b)?);
        if let Some(p) = &opts.pcap {
            std::fs::create_dir_all(&p.dir).map_err(|source| WanError::Io {
                what: format!("create {}", p.dir.display()),
                source,
            })?;
        }
        let realtime_offset = sys::realtime_ns().saturating_sub(sys::mono_ns());
        let spawn = |direction: Direction,
                     input: Arc<OwnedFd>,
                     output: Arc<OwnedFd>,
                     cfg: DirectionConfig,
                     seed: u64,
                     mtu: usize|
         -> Result<DirHandle, WanError> {
            let name = match direction {
                Direction::AToB => "a-to-b",
                Direction::BToA => "b-to-a",
            };
            let pcap = match &opts.pcap {
                None => None,
                Some(p) => {
                    let mk = |side: &str| {
                        let path = p.dir.join(format!("{name}.{side}.pcap"));
                        PcapWriter::create(&path, p.snaplen, p.max_bytes_per_file).map_err(
                            |source| WanError::Io {
                                what: format!("create {}", path.display()),
                                source,
                            },
                        )
                    };
                    Some((mk("ingress")?, mk("egress")?))
                }
            };
            let gso = opts.gso;
            let wake = Arc::new(sys::eventfd().map_err(|source| WanError::Io {
                what: "eventfd".into(),
                source,
            })?);
            let (tx, rx) = channel();
            let w = wake.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wan-{name}"))
                .spawn(move || {
                    let mut d = DirLoop {
                        direction,
                        link: Link::new(cfg, seed),
                        input,
                        output,
                        wake: w,
                        rx,
                        pool: Vec::new(),
                        mtu,
                        driver: DriverCounters::default(),
                        pcap,
                        realtime_offset,
                        overshoot_ewma_ns: 100_000,
                        gso,
                        due: Vec::new(),
                        runs: Vec::new(),
                        headers: Vec::new(),
                        blind_since_ns: None,
                        inbox: Vec::new(),
                    };
                    d.run();
                })
                .map_err(|source| WanError::Io {
                    what: "spawn thread".into(),
                    source,
                })?;
            Ok(DirHandle {
                tx,
                wake,
                thread: Some(thread),
            })
        };
        // Distinct but reproducible streams per direction.
        let a_to_b = spawn(
            Direction::AToB,
            fd_a.clone(),
            fd_b.clone(),
            opts.a_to_b,
            opts.seed,
            opts.a.mtu,
        )?;
        let b_to_a = spawn(
            Direction::BToA,
            fd_b,
            fd_a,
            opts.b_to_a,
            opts.seed ^ 0x5bd1_e995,
            opts.b.mtu,
        )?;
        Ok(Self {
            dirs: [a_to_b, b_to_a],
            seed: opts.seed,
            started_ns: sys::mono_ns(),
        })
    }

    fn handle(&self, d: Direction) -> &DirHandle {
        match d {
            Direction::AToB => &self.dirs[0],
            Direction::BToA => &self.dirs[1],
        }
    }

    fn send(&self, d: Direction, cmd: Command) -> Result<(), WanError> {
        let h = self.handle(d);
        h.tx.send(cmd).map_err(|_| WanError::Stopped)?;
        sys::eventfd_signal(h.wake.as_raw_fd());
        Ok(())
    }

    pub fn report(&self, d: Direction) -> Result<DirectionReport, WanError> {
        let (tx, rx) = channel();
        self.send(d, Command::Report(tx))?;
        rx.recv().map_err(|_| WanError::Stopped)
    }

    pub fn stats(&self) -> Result<StatsReply, WanError> {
        Ok(StatsReply {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            seed: self.seed,
            uptime_ms: (sys::mono_ns() - self.started_ns) / 1_000_000,
            a_to_b: self.report(Direction::AToB)?,
            b_to_a: self.report(Direction::BToA)?,
        })
    }

    /// Changes one direction live. Queued packets are kept.
    pub fn set(&self, d: Direction, cfg: DirectionConfig) -> Result<(), WanError> {
        cfg.validate()?;
        self.send(d, Command::Set(cfg))?;
        // A report round-trip makes the change visible before returning.
        self.report(d).map(|_| ())
    }

    pub fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        for d in [Direction::AToB, Direction::BToA] {
            let _ = self.send(d, Command::Stop);
        }
        for h in &mut self.dirs {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The arrival stamp of the `i`-th of `count` packets read (the `i`-th at `read_ns`, the last
/// at `last_ns`) after a sleep that began at `since_ns`: arrivals are spread evenly over
/// `since_ns`..=`last_ns`, at most [`BLIND_MAX_NS`] back, the last one at its read time and
/// none later than its read.
fn spread_arrival(since_ns: u64, last_ns: u64, count: usize, i: usize, read_ns: u64) -> u64 {
    let since = since_ns.max(last_ns.saturating_sub(BLIND_MAX_NS));
    let span = last_ns.saturating_sub(since);
    read_ns.min(since + span * (i as u64 + 1) / count.max(1) as u64)
}

struct DirLoop {
    direction: Direction,
    link: Link<Vec<u8>>,
    input: Arc<OwnedFd>,
    output: Arc<OwnedFd>,
    wake: Arc<OwnedFd>,
    rx: Receiver<Command>,
    pool: Vec<Vec<u8>>,
    mtu: usize,
    driver: DriverCounters,
    pcap: Option<(PcapWriter, PcapWriter)>,
    realtime_offset: u64,
    /// Smoothed lateness of timer wake-ups (this machine's timers overshoot by ~70-100 µs).
    overshoot_ewma_ns: u64,
    /// Buffers start with a virtio-net header; due TCP trains are merged on write.
    gso: bool,
    due: Vec<Vec<u8>>,
    runs: Vec<std::ops::Range<usize>>,
    headers: Vec<u8>,
    /// Set when the thread slept on the load tick without watching its input: packets read
    /// next arrived somewhere after this instant.
    blind_since_ns: Option<u64>,
    /// Packets of one read batch with their read times, before they are offered.
    inbox: Vec<(Vec<u8>, u32, u64)>,
}

impl DirLoop {
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_LIMIT {
            self.pool.push(buf);
        }
    }

    /// Handles pending commands; false when told to stop.
    fn commands(&mut self) -> bool {
        sys::eventfd_clear(self.wake.as_raw_fd());
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Stop => return false,
                Command::Set(cfg) => self.link.set_config(sys::mono_ns(), cfg),
                Command::Report(tx) => {
                    if let Some((i, e)) = &mut self.pcap {
                        let _ = i.flush();
                        let _ = e.flush();
                        self.driver.pcap_skipped = i.skipped + e.skipped;
                    }
                    let _ = tx.send(DirectionReport {
                        direction: self.direction,
                        config: self.link.config().clone(),
                        stats: self.link.stats(),
                        driver: self.driver.clone(),
                    });
                }
            }
        }
        true
    }

    fn margin_ns(&self) -> u64 {
        (2 * self.overshoot_ewma_ns).clamp(MARGIN_MIN_NS, MARGIN_MAX_NS)
    }

    /// Sleeps until input arrives or the model's next deadline; see [`SPIN_MAX_HELD`].
    fn wait(&mut self, fds: &[RawFd]) {
        let Some(deadline) = self.link.next_deadline_ns() else {
            sys::wait_readable(fds, None);
            return;
        };
        let now = sys::mono_ns();
        if deadline <= now {
            return;
        }
        let sparse = self.link.held_packets() <= SPIN_MAX_HELD;
        if !sparse {
            // Commands still wake it; input is read on the next tick.
            self.blind_since_ns = Some(now);
            sys::wait_readable(&fds[1..], Some(LOAD_TICK_NS));
            return;
        }
        let margin = if sparse { self.margin_ns() } else { 0 };
        let remaining = deadline - now;
        if remaining > margin {
            let target = deadline - margin;
            if sys::wait_readable(fds, Some(target - now)) {
                return; // input or a command: handle it first
            }
            let late = sys::mono_ns().saturating_sub(target);
            self.overshoot_ewma_ns = (7 * self.overshoot_ewma_ns + late) / 8;
        }
        if sparse {
            // Spin the last stretch, still taking input as it comes.
            while sys::mono_ns() < deadline {
                if sys::wait_readable(fds, Some(0)) {
                    return;
                }
                std::hint::spin_loop();
            }
        }
    }

    /// Reads up to a batch of packets; returns true if the batch was full (more may wait).
    ///
    /// A packet enters the model at its read time, except after a load tick: then the
    /// packets queued in the TUN arrived at unknown instants while the thread slept, and
    /// stamping them all at the read would leave the emulated link idle for up to a tick
    /// plus the timer's overshoot (~150 µs, 12 packets at 1 Gbit/s) whenever its queue ran
    /// short — a cost real links do not charge, and one that falls on paced senders, which
    /// keep that queue short. Their arrivals are instead spread evenly over the time asleep
    /// (at most [`BLIND_MAX_NS`]), the estimate that is exact for paced input.
    fn read_batch(&mut self) -> bool {
        let fd: RawFd = self.input.as_raw_fd();
        let off = if self.gso { VNET_HDR_LEN } else { 0 };
        let mut inbox = std::mem::take(&mut self.inbox);
        let mut full = true;
        for _ in 0..READ_BATCH {
            let mut buf = self.pool.pop().unwrap_or_default();
            buf.resize(off + self.mtu.clamp(576, MAX_PACKET_BYTES), 0);
            match sys::read_packet(fd, &mut buf) {
                Ok(Some(n)) if n > off => {
                    buf.truncate(n);
                    // Only checksum offload is on, so the kernel never hands us a super-packet.
                    if self.gso && buf[1] != 0 {
                        self.driver.unexpected_offload += 1;
                        self.recycle(buf);
                        continue;
                    }
                    inbox.push((buf, (n - off) as u32, sys::mono_ns()));
                }
                Ok(Some(_)) => self.recycle(buf),
                Ok(None) => {
                    self.recycle(buf);
                    full = false;
                    break;
                }
                Err(_) => {
                    self.driver.read_errors += 1;
                    self.recycle(buf);
                    full = false;
                    break;
                }
            }
        }
        if let (Some(since), Some(&(_, _, last))) = (self.blind_since_ns.take(), inbox.last()) {
            let count = inbox.len();
            for (i, item) in inbox.iter_mut().enumerate() {
                item.2 = spread_arrival(since, last, count, i, item.2);
            }
        }
        for (buf, len, at) in inbox.drain(..) {
            if let Some((ingress, _)) = &mut self.pcap {
                let _ = ingress.record(at + self.realtime_offset, &buf[off..]);
            }
            match self.link.offer(at, len, buf) {
                Offer::Accepted => {}
                Offer::QueueDrop(b) | Offer::RandomDrop(b) => self.recycle(b),
            }
        }
        self.inbox = inbox;
        full
    }

    fn deliver_due(&mut self) {
        let fd = self.output.as_raw_fd();
        let now = sys::mono_ns();
        let mut due = std::mem::take(&mut self.due);
        while let Some(buf) = self.link.poll_deliver(now) {
            due.push(buf);
        }
        if due.is_empty() {
            self.due = due;
            return;
        }
        let off = if self.gso { VNET_HDR_LEN } else { 0 };
        if let Some((_, egress)) = &mut self.pcap {
            let t = sys::mono_ns() + self.realtime_offset;
            for b in &due {
                let _ = egress.record(t, &b[off..]);
            }
        }
        if self.gso {
            // Single packets go out with the header they came with: zero, or NEEDS_CSUM with
            // the partial checksum's start and offset (checksum offload is on).
            let pkts: Vec<&[u8]> = due.iter().map(|b| &b[VNET_HDR_LEN..]).collect();
            gso::plan(&pkts, &mut self.runs);
            for run in &self.runs {
                let ok = if run.len() == 1 {
                    sys::write_packet(fd, &due[run.start]).is_ok()
                } else {
                    let train = &pkts[run.clone()];
                    let mut vnet = [0u8; VNET_HDR_LEN];
                    gso::merged_headers(train, &mut vnet, &mut self.headers);
                    let hl = self.headers.len();
                    // No allocation per write: runs hold at most MAX_SEGMENTS packets.
                    let mut parts: [&[u8]; gso::MAX_SEGMENTS + 2] = [&[]; gso::MAX_SEGMENTS + 2];
                    parts[0] = &vnet;
                    parts[1] = &self.headers;
                    for (slot, p) in parts[2..].iter_mut().zip(train) {
                        *slot = &p[hl..];
                    }
                    let parts = &parts[..train.len() + 2];
                    self.driver.merged_writes += 1;
                    self.driver.merged_packets += run.len() as u64;
                    sys::writev_packet(fd, parts).is_ok()
                };
                if !ok {
                    self.driver.write_errors += run.len() as u64;
                }
            }
        } else {
            for b in &due {
                if sys::write_packet(fd, b).is_err() {
                    self.driver.write_errors += 1;
                }
            }
        }
        for b in due.drain(..) {
            self.recycle(b);
        }
        self.due = due;
    }

    fn run(&mut self) {
        sys::set_timer_slack_1us();
        let fds = [self.input.as_raw_fd(), self.wake.as_raw_fd()];
        loop {
            if !self.commands() {
                break;
            }
            let more = self.read_batch();
            self.deliver_due();
            if !more {
                self.wait(&fds);
            }
        }
        if let Some((i, e)) = &mut self.pcap {
            let _ = i.flush();
            let _ = e.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(since: u64, reads: &[u64]) -> Vec<u64> {
        let last = reads.last().copied().unwrap_or(0);
        let n = reads.len();
        (0..n)
            .map(|i| spread_arrival(since, last, n, i, reads[i]))
            .collect()
    }

    #[test]
    fn arrivals_after_a_tick_are_spread_over_the_sleep() {
        // Four packets read at 1000..=1003 after a sleep from 800: a quarter of 203 ns apart.
        assert_eq!(
            spread(800, &[1000, 1001, 1002, 1003]),
            [850, 901, 952, 1003]
        );
        // Never later than the read.
        assert_eq!(spread(0, &[10, 10]), [5, 10]);
        // A long sleep is spread over BLIND_MAX_NS at most.
        let last = 10 * BLIND_MAX_NS;
        assert_eq!(spread(0, &[last, last]), [last - BLIND_MAX_NS / 2, last]);
        // One packet keeps its read time; nothing read, nothing to do.
        assert_eq!(spread(5, &[42]), [42]);
        assert!(spread(5, &[]).is_empty());
    }
}
