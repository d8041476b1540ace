//! The few system calls std does not offer: epoll with a nanosecond timeout, batched UDP
//! (recvmmsg/sendmmsg), the original destination of a REDIRECTed connection, SO_MARK,
//! abortive close and the monotonic clock. All `unsafe` of the node lives here.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

/// Firewall mark on the node's own TCP connections so interception rules skip them.
pub const NODE_MARK: u32 = 0x7e57;

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Timer slack of 1 µs so pacing timers fire when asked.
pub fn set_timer_slack() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64) };
}

/// Puts the calling thread under SCHED_FIFO at `priority` (1..=99), or back under the
/// normal time-sharing policy with `None`. Needs CAP_SYS_NICE to raise.
pub fn set_realtime(priority: Option<u8>) -> io::Result<()> {
    let (policy, prio) = match priority {
        Some(p) => (libc::SCHED_FIFO, libc::c_int::from(p)),
        None => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    cvt(unsafe { libc::sched_setscheduler(0, policy, &param) }).map(drop)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[derive(Debug)]
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

pub const READ: u32 = libc::EPOLLIN as u32;
pub const WRITE: u32 = libc::EPOLLOUT as u32;
pub const EDGE: u32 = libc::EPOLLET as u32;
pub const HUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
        })
    }

    pub fn add(&self, fd: RawFd, token: u64, interest: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest,
            u64: token,
        };
        // SAFETY: valid epoll fd and event pointer.
        cvt(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
    }

    pub fn delete(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll fd and event pointer; errors (fd already gone) are harmless.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits up to `timeout_ns` (None = forever); returns (token, events) pairs.
    pub fn wait(&mut self, timeout_ns: Option<u64>, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        out.clear();
        let ts = timeout_ns.map(|t| libc::timespec {
            tv_sec: (t / 1_000_000_000) as libc::time_t,
            tv_nsec: (t % 1_000_000_000) as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: the events buffer outlives the call and its length is passed.
        let n = unsafe {
            libc::epoll_pwait2(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                tsp,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        for ev in &self.events[..n as usize] {
            out.push((ev.u64, ev.events));
        }
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: pointer to a c_int with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Large socket buffers (root can exceed rmem_max with the FORCE variants).
pub fn set_buffers(fd: &impl AsRawFd, bytes: usize) {
    let fd = fd.as_raw_fd();
    let b = bytes as libc::c_int;
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, b).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, b);
    }
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, b).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, b);
    }
}

pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

pub fn set_nodelay(fd: RawFd) {
    let _ = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

/// Sets DF on UDP so path-MTU probes are not fragmented.
pub fn set_dont_fragment(fd: RawFd) {
    let _ = setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    );
}

/// Close with RST instead of FIN (maps a stream reset onto TCP).
pub fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: pointer to a linger struct with its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Destination of a connection before nftables REDIRECT rewrote it.
pub fn original_dst(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: zeroed sockaddr_in is valid; getsockopt writes at most `len` bytes.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: as above.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    })?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Pending socket error (non-blocking connect result).
pub fn take_error(fd: RawFd) -> io::Result<()> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: pointer to a c_int with its size.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if v != 0 {
        Err(io::Error::from_raw_os_error(v))
    } else {
        Ok(())
    }
}

/// A non-blocking TCP connect to an IPv4 address with the node's mark; returns the fd.
pub fn connect_nonblocking(target: SocketAddr) -> io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = target else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "IPv6 targets are not supported",
        ));
    };
    // SAFETY: plain syscall.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: we own the new fd; TcpStream takes ownership and closes it.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    set_mark(fd, NODE_MARK)?;
    set_nodelay(fd);
    let sa = sockaddr_in(v4);
    // SAFETY: valid sockaddr_in pointer and size.
    let r = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

pub const BATCH: usize = 32;
pub const DATAGRAM_MAX: usize = 2048;
/// Receive buffer per message: room for a whole GRO train (the kernel caps one at 64 KiB).
const GRO_BUFFER: usize = 65_536;
/// Most datagrams one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one UDP GSO send (an IPv4 packet's 64 KiB less headers).
const GSO_MAX_BYTES: usize = 65_000;

/// Asks the kernel to hand over trains of same-flow datagrams as one buffer plus their
/// segment size (`UDP_GRO`); false where the kernel lacks it.
pub fn enable_udp_gro(fd: RawFd) -> bool {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// Reusable buffers for sendmmsg of IPv4 datagrams. Runs of equal-size datagrams to one
/// address go out as one UDP GSO message (`UDP_SEGMENT`): one pass through the stack for
/// the run; the device (or the kernel just before it) cuts it into the original datagrams.
#[derive(Debug)]
pub struct UdpBatch {
    bufs: Vec<[u8; DATAGRAM_MAX]>,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_in>,
    count: usize,
    gso: bool,
    /// GSO messages sent and the datagrams they carried.
    pub gso_messages: u64,
    pub gso_datagrams: u64,
}

impl Default for UdpBatch {
    fn default() -> Self {
        Self::new()
    }
}

fn sockaddr_v4(a: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
        u16::from_be(a.sin_port),
    ))
}

fn same_addr(a: &libc::sockaddr_in, b: &libc::sockaddr_in) -> bool {
    a.sin_addr.s_addr == b.sin_addr.s_addr && a.sin_port == b.sin_port
}

/// Control-message room for one `c_int` (`UDP_SEGMENT` wants a u16, `UDP_GRO` reports an
/// int); u64 words keep `cmsghdr` aligned.
const CMSG_WORDS: usize = 4;

impl UdpBatch {
    pub fn new() -> Self {
        // SAFETY: zeroed sockaddr_in is a valid value.
        let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![[0u8; DATAGRAM_MAX]; BATCH],
            lens: vec![0; BATCH],
            addrs: vec![zero; BATCH],
            count: 0,
            gso: true,
            gso_messages: 0,
            gso_datagrams: 0,
        }
    }

    /// Sends every datagram on its own (no `UDP_SEGMENT`).
    pub fn without_gso(mut self) -> Self {
        self.gso = false;
        self
    }

    pub fn gso(&self) -> bool {
        self.gso
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }
    pub fn clear(&mut self) {
        self.count = 0;
    }

    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        (sockaddr_v4(&self.addrs[i]), &self.bufs[i][..self.lens[i]])
    }

    /// Adds a datagram to send. IPv6 destinations are refused by the config, never reach here.
    pub fn push(&mut self, to: SocketAddr, data: &[u8]) {
        let SocketAddr::V4(v4) = to else { return };
        let i = self.count;
        self.bufs[i][..data.len()].copy_from_slice(data);
        self.lens[i] = data.len();
        self.addrs[i] = sockaddr_in(v4);
        self.count += 1;
    }

    /// Splits the queue into messages: runs of equal-size datagrams to one address, the last
    /// possibly shorter (when GSO is on), else single datagrams. Returns the run lengths.
    fn runs(&self) -> Vec<usize> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.count {
            let mut j = i + 1;
            if self.gso {
                while j < self.count
                    && j - i < GSO_MAX_SEGMENTS
                    && (j - i + 1) * self.lens[i] <= GSO_MAX_BYTES
                    && self.lens[j] <= self.lens[i]
                    && self.lens[j] > 0
                    && same_addr(&self.addrs[j], &self.addrs[i])
                {
                    j += 1;
                    if self.lens[j - 1] < self.lens[i] {
                        break; // a short datagram ends the run
                    }
                }
            }
            runs.push(j - i);
            i = j;
        }
        runs
    }

    /// Sends the queued datagrams; returns how many left (the rest stay queued at the front).
    pub fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        if self.count == 0 {
            return Ok(0);
        }
        let runs = self.runs();
        let mut iovs: Vec<libc::iovec> = self.bufs[..self.count]
            .iter_mut()
            .zip(&self.lens)
            .map(|(b, &len)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: len,
            })
            .collect();
        let mut cmsgs = vec![[0u64; CMSG_WORDS]; runs.len()];
        // SAFETY: zeroed mmsghdr is valid; fields are filled below.
        let mut msgs: Vec<libc::mmsghdr> = (0..runs.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let mut first = 0;
        for ((m, &run), cmsg) in msgs.iter_mut().zip(&runs).zip(cmsgs.iter_mut()) {
            let h = &mut m.msg_hdr;
            h.msg_iov = &mut iovs[first];
            h.msg_iovlen = run;
            h.msg_name = (&mut self.addrs[first] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if run > 1 {
                h.msg_control = cmsg.as_mut_ptr().cast();
                // SAFETY: CMSG_* compute sizes and walk the buffer we just attached, which
                // holds CMSG_WORDS u64s (>= CMSG_SPACE of a u16).
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(
                        libc::CMSG_DATA(c).cast::<u16>(),
                        self.lens[first] as u16,
                    );
                }
            }
            first += run;
        }
        // SAFETY: pointers refer to our buffers, alive for the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            if runs[0] > 1 && e.raw_os_error() == Some(libc::EIO) {
                // The route's device cannot complete checksums, which UDP GSO needs: send
                // datagrams one by one from now on.
                eprintln!(
                    "tern node: UDP GSO refused by the kernel ({e}); sending datagrams singly"
                );
                self.gso = false;
                return Ok(0);
            }
            // A message the kernel refuses (e.g. EMSGSIZE for a probe over the path MTU) is
            // dropped; the transport recovers.
            self.drop_front(runs[0]);
            return Err(e);
        }
        for &run in runs[..n as usize].iter().filter(|&&r| r > 1) {
            self.gso_messages += 1;
            self.gso_datagrams += run as u64;
        }
        let sent: usize = runs[..n as usize].iter().sum();
        self.drop_front(sent);
        Ok(sent)
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.count);
        for i in n..self.count {
            self.bufs.swap(i - n, i);
            self.lens[i - n] = self.lens[i];
            self.addrs[i - n] = self.addrs[i];
        }
        self.count -= n;
    }
}

/// Reusable buffers for recvmmsg of IPv4 datagrams, GRO trains included: a message the
/// kernel reports with a `UDP_GRO` segment size holds several datagrams back to back, each
/// that size but the last.
#[derive(Debug)]
pub struct UdpRecv {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    /// (message, offset, length) of every datagram received.
    datagrams: Vec<(usize, usize, usize)>,
    messages: usize,
    /// Trains received as one buffer, and the datagrams in them.
    pub gro_trains: u64,
    pub gro_datagrams: u64,
}

impl Default for UdpRecv {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpRecv {
    pub fn new() -> Self {
        // SAFETY: zeroed sockaddr_in is a valid value.
        let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![0u8; BATCH * GRO_BUFFER],
            addrs: vec![zero; BATCH],
            cmsgs: vec![[0u64; CMSG_WORDS]; BATCH],
            datagrams: Vec::with_capacity(BATCH),
            messages: 0,
            gro_trains: 0,
            gro_datagrams: 0,
        }
    }

    /// Datagrams received by the last `recv`.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }
    /// True when the last `recv` filled every message slot (more may wait).
    pub fn was_full(&self) -> bool {
        self.messages == BATCH
    }

    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        let (m, off, len) = self.datagrams[i];
        let at = m * GRO_BUFFER + off;
        (sockaddr_v4(&self.addrs[m]), &self.bufs[at..at + len])
    }

    /// Receives up to BATCH messages; Ok(0) when none is waiting. Returns datagrams.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.datagrams.clear();
        self.messages = 0;
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .chunks_mut(GRO_BUFFER)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: GRO_BUFFER,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; fields are filled below.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            let h = &mut m.msg_hdr;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_WORDS * 8;
        }
        // SAFETY: every pointer refers to buffers that live until the call returns.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        self.messages = n as usize;
        for (i, m) in msgs.iter().enumerate().take(self.messages) {
            let len = m.msg_len as usize;
            let mut seg = 0usize;
            // SAFETY: the kernel filled msg_control/msg_controllen of this header; CMSG_*
            // walk only within that length.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>())
                            .max(0) as usize;
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
            if seg == 0 || seg >= len {
                self.datagrams.push((i, 0, len));
                continue;
            }
            self.gro_trains += 1;
            let mut off = 0;
            while off < len {
                let l = seg.min(len - off);
                self.datagrams.push((i, off, l));
                self.gro_datagrams += 1;
                off += l;
            }
        }
        Ok(self.datagrams.len())
    }
}

/// Creates (or attaches to) a TAP interface in the current network namespace: one Ethernet
/// frame per read/write, no packet-info header; non-blocking.
pub fn open_tap(name: &str) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) })
        .map_err(|e| io::Error::new(e.kind(), format!("create TAP device {name:?}: {e}")))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// The calling thread enters SCHED_FIFO and leaves it again (or, without
    /// CAP_SYS_NICE, the kernel refuses and nothing changes).
    #[test]
    fn realtime_policy_is_set_and_cleared() {
        // SAFETY: querying the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        match set_realtime(Some(1)) {
            Ok(()) => {
                assert_eq!(policy(), libc::SCHED_FIFO);
                set_realtime(None).unwrap();
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
        }
    }

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 31 + k * 7) as u8).collect()
    }

    /// Runs of equal-size datagrams (with a shorter last one) leave as GSO messages and
    /// arrive, split from GRO trains, as the same datagrams in the same order.
    #[test]
    fn gso_sends_and_gro_receives_keep_every_datagram() {
        let rx1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_buffers(&rx1, 4 << 20);
        assert!(enable_udp_gro(rx1.as_raw_fd()));
        let (a1, a2) = (rx1.local_addr().unwrap(), rx2.local_addr().unwrap());
        // 10 x 1200 + 500 to rx1, 3 x 800 to rx2, 5 x 1200 to rx1.
        let mut plan: Vec<(SocketAddr, usize)> = vec![(a1, 1200); 10];
        plan.push((a1, 500));
        plan.extend([(a2, 800); 3]);
        plan.extend([(a1, 1200); 5]);
        let mut batch = UdpBatch::new();
        for (i, &(to, len)) in plan.iter().enumerate() {
            batch.push(to, &payload(i, len));
        }
        assert_eq!(batch.runs(), vec![11, 3, 5]);
        let mut sent = 0;
        while !batch.is_empty() {
            sent += batch.send(tx.as_raw_fd()).unwrap();
        }
        assert_eq!(sent, plan.len());
        assert_eq!((batch.gso_messages, batch.gso_datagrams), (3, 19));

        let mut recv = UdpRecv::new();
        let mut got = Vec::new();
        for _ in 0..1000 {
            if recv.recv(rx1.as_raw_fd()).unwrap() == 0 {
                if got.len() == 16 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            for i in 0..recv.len() {
                got.push(recv.get(i).1.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = plan
            .iter()
            .enumerate()
            .filter(|(_, (to, _))| *to == a1)
            .map(|(i, &(_, len))| payload(i, len))
            .collect();
        assert_eq!(got, want);
        assert!(recv.gro_trains > 0 && recv.gro_datagrams == 16, "{recv:?}");
        let mut buf = [0u8; 2000];
        for i in 11..14 {
            let n = rx2.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &payload(i, 800)[..]);
        }
    }

    #[test]
    fn without_gso_every_datagram_is_its_own_message() {
        let mut batch = UdpBatch::new().without_gso();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for _ in 0..4 {
            batch.push(to, &[0; 100]);
        }
        assert_eq!(batch.runs(), vec![1, 1, 1, 1]);
    }
}

/// A non-blocking eventfd: another thread wakes the node's epoll loop with [`EventFd::notify`].
#[derive(Debug)]
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: eventfd returned a new descriptor that nothing else owns.
        Ok(EventFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a u64 to our eventfd; a full counter (EAGAIN) is fine.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter; true if it had been notified.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) == 8 }
    }
}
