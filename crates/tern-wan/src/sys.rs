//! The few system calls the emulator needs, each behind a safe wrapper.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime cannot fail for these clocks.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Asks the kernel to fire this thread's timers within 1 µs of their deadline (the default
/// slack is 50 µs, which would show up as added delay).
pub fn set_timer_slack_1us() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer argument and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0) };
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Attaches to the existing TUN device `dev` (L3, no packet-info header) and returns its
/// descriptor in non-blocking mode. With `netns`, the device is looked up in the named
/// network namespace (`/run/netns/NAME`, as made by `ip netns add`); the switch happens on
/// a short-lived thread, so the caller's namespace never changes.
/// With `vnet_hdr`, every read and write carries a virtio-net header (`IFF_VNET_HDR`), which
/// lets writes be GSO super-packets.
pub fn open_tun(netns: Option<&str>, dev: &str, vnet_hdr: bool) -> io::Result<OwnedFd> {
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {dev:?}"),
        ));
    }
    let netns = netns.map(str::to_owned);
    let dev = dev.to_owned();
    std::thread::spawn(move || -> io::Result<OwnedFd> {
        if let Some(ns) = netns {
            let f = File::open(format!("/run/netns/{ns}"))
                .map_err(|e| io::Error::new(e.kind(), format!("network namespace {ns:?}: {e}")))?;
            // SAFETY: setns with a namespace descriptor we hold open; affects this thread only.
            cvt(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })?;
        }
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: open with a valid NUL-terminated path.
        let raw = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        // SAFETY: `raw` is a fresh descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(dev.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let vnet = if vnet_hdr { libc::IFF_VNET_HDR } else { 0 };
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })
            .map_err(|e| io::Error::new(e.kind(), format!("attach to TUN device {dev:?}: {e}")))?;
        if vnet_hdr {
            // Checksum offload only (no TSO/USO, so reads stay single packets): senders skip
            // computing checksums, packets arrive with NEEDS_CSUM and the partial sum, and the
            // emulator passes that header on, as a veth pair would. UDP GSO senders need it.
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::TUN_F_CSUM) })
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("checksum offload on {dev:?}: {e}"))
                })?;
        }
        set_nonblocking(fd.as_raw_fd())?;
        Ok(fd)
    })
    .join()
    .map_err(|_| io::Error::other("TUN open thread panicked"))?
}

/// A non-blocking eventfd used to wake a direction thread for a control command.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes integer arguments and returns a new descriptor or -1.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `raw` is a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; failure (counter full) is harmless.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

pub fn eventfd_clear(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Reads one packet; `Ok(None)` when nothing is waiting.
pub fn read_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: reads at most buf.len() bytes into a live, writable buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// Writes one packet to a TUN device (the kernel takes it whole or not at all).
pub fn write_packet(fd: RawFd, pkt: &[u8]) -> io::Result<()> {
    // SAFETY: writes pkt.len() bytes from a live buffer.
    let n = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes one packet gathered from several slices (at most 64).
pub fn writev_packet(fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 64];
    let n = parts.len().min(iov.len());
    for (v, p) in iov.iter_mut().zip(parts) {
        *v = libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        };
    }
    // SAFETY: the first `n` iovecs point into slices that outlive the call; writev only reads them.
    let r = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until `fds` are readable or `timeout_ns` passes (None: no timeout). Returns false
/// when the timeout expired with nothing readable.
pub fn wait_readable(fds: &[RawFd], timeout_ns: Option<u64>) -> bool {
    let mut pfds: [libc::pollfd; 2] = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 2];
    for (p, fd) in pfds.iter_mut().zip(fds) {
        *p = libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        };
    }
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: pfds and ts live across the call; nfds does not exceed pfds' length.
    let n = unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            fds.len().min(2) as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    n > 0
}
