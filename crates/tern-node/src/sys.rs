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

/// Reusable buffers for recvmmsg/sendmmsg of IPv4 datagrams.
#[derive(Debug)]
pub struct UdpBatch {
    bufs: Vec<[u8; DATAGRAM_MAX]>,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_in>,
    count: usize,
}

impl Default for UdpBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpBatch {
    pub fn new() -> Self {
        // SAFETY: zeroed sockaddr_in is a valid value.
        let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        Self {
            bufs: vec![[0u8; DATAGRAM_MAX]; BATCH],
            lens: vec![0; BATCH],
            addrs: vec![zero; BATCH],
            count: 0,
        }
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
        let a = &self.addrs[i];
        let addr = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        (SocketAddr::V4(addr), &self.bufs[i][..self.lens[i]])
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

    /// iovecs and message headers for the first `count` slots: receive (`full`) offers each
    /// whole buffer, send offers the queued length. The headers point into `self` and into
    /// the returned iovec Vec, whose heap buffer stays put while the caller holds it.
    fn headers(&mut self, count: usize, full: bool) -> (Vec<libc::iovec>, Vec<libc::mmsghdr>) {
        let mut iovs: Vec<libc::iovec> = self.bufs[..count]
            .iter_mut()
            .zip(&self.lens)
            .map(|(b, &len)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: if full { DATAGRAM_MAX } else { len },
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; fields are filled below.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        (iovs, msgs)
    }

    /// Receives up to BATCH datagrams; Ok(0) when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let (_iovs, mut msgs) = self.headers(BATCH, true);
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
            self.count = 0;
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        for (len, m) in self.lens.iter_mut().zip(&msgs).take(n as usize) {
            *len = m.msg_len as usize;
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// Sends the queued datagrams; returns how many left (the rest stay queued at the front).
    pub fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        if self.count == 0 {
            return Ok(0);
        }
        let (_iovs, mut msgs) = self.headers(self.count, false);
        // SAFETY: pointers refer to our buffers, alive for the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                self.count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            // A datagram the kernel refuses (e.g. EMSGSIZE) is dropped; the transport recovers.
            self.drop_front(1);
            return Err(e);
        }
        let n = n as usize;
        self.drop_front(n);
        Ok(n)
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
