//! The 1 MiB request/response probe behind `tern bench rr-server` and `tern bench rr-client`.
//!
//! Each request is a new TCP connection: the client sends [`REQUEST`], the server checks it,
//! replies with exactly [`RESPONSE_BYTES`] of a fixed pseudo-random stream (incompressible,
//! so compressing transports gain nothing from the payload itself) and closes. The client
//! times connect() start to the last byte (EOF) and checks every byte against the same
//! stream; a short, long or corrupt reply is an error, never a data point.
//!
//! ```text
//!   client                          server
//!   connect ───── SYN ─────────────▶ accept, TCP_CONGESTION (optional)
//!   REQUEST ───────────────────────▶ check (≤ MAX_REQUEST_BYTES, exact match)
//!           ◀────── 1 MiB ────────── write_all, close
//!   EOF: stop the clock, compare
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::tools::quantile;
use crate::{BenchError, error_chain};

/// The one request the server accepts (version 1 of this probe).
pub const REQUEST: &[u8] = b"TERN-RR/1 GET 1048576\n";
/// Size of every response.
pub const RESPONSE_BYTES: usize = 1 << 20;
/// The server reads at most this much looking for the request's newline.
pub const MAX_REQUEST_BYTES: usize = 64;
/// Bound on connect, each read and each write; a stalled transfer fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the number of requests one client run makes.
pub const MAX_COUNT: u32 = 10_000;
/// Seed of the payload stream.
const PAYLOAD_SEED: u64 = 0x7465_726e_2d72_7231; // "tern-rr1"

/// One step of splitmix64 (also the accel bench's incompressible payload).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The response body: [`RESPONSE_BYTES`] of a seeded splitmix64 stream.
pub fn payload() -> Vec<u8> {
    let mut state = PAYLOAD_SEED;
    let mut v = Vec::with_capacity(RESPONSE_BYTES);
    while v.len() < RESPONSE_BYTES {
        v.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    v.truncate(RESPONSE_BYTES);
    v
}

/// Sets the socket's congestion control (`TCP_CONGESTION`).
pub fn set_congestion(stream: &TcpStream, cc: &str) -> Result<(), BenchError> {
    let fd = stream.as_raw_fd();
    // SAFETY: fd is an open socket owned by `stream` for the duration of the call; the
    // option value is a valid buffer of the given length, which the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(BenchError::Io {
            what: format!("set TCP congestion control {cc}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Reads the request line (up to and including `\n`, at most [`MAX_REQUEST_BYTES`]).
fn read_request(stream: &mut TcpStream) -> Result<Vec<u8>, BenchError> {
    let mut buf = Vec::with_capacity(MAX_REQUEST_BYTES);
    let mut byte = [0u8; 1];
    while buf.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut byte).map_err(io("read request"))? {
            0 => break,
            _ => {
                buf.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
        }
    }
    Ok(buf)
}

fn serve_one(mut stream: TcpStream, cc: Option<&str>, body: &[u8]) -> Result<(), BenchError> {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    if let Some(cc) = cc {
        set_congestion(&stream, cc)?;
    }
    let req = read_request(&mut stream)?;
    if req != REQUEST {
        return Err(BenchError::Failed {
            tool: "rr-server",
            detail: format!("bad request {:?}", String::from_utf8_lossy(&req)),
        });
    }
    stream.write_all(body).map_err(io("write response"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(io("close response"))?;
    Ok(())
}

/// Serves requests one after another until killed (or `max_requests` have been answered).
/// A bad request is logged and its connection closed without a reply.
pub fn serve(
    listen: SocketAddr,
    cc: Option<&str>,
    max_requests: Option<u64>,
) -> Result<(), BenchError> {
    let listener = TcpListener::bind(listen).map_err(io(format!("listen on {listen}")))?;
    eprintln!("rr-server: listening on {listen}");
    serve_on(listener, cc, max_requests)
}

/// [`serve`] on a listener that is already bound.
pub fn serve_on(
    listener: TcpListener,
    cc: Option<&str>,
    max_requests: Option<u64>,
) -> Result<(), BenchError> {
    let body = payload();
    for (served, conn) in (1u64..).zip(listener.incoming()) {
        let stream = conn.map_err(io("accept"))?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Err(e) = serve_one(stream, cc, &body) {
            eprintln!("rr-server: {peer}: {e}");
        }
        if max_requests.is_some_and(|m| served >= m) {
            break;
        }
    }
    Ok(())
}

/// Times of one client run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RrReport {
    pub count: u32,
    pub response_bytes: usize,
    /// connect() start to the last byte, per request, in order.
    pub times_ms: Vec<f64>,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl RrReport {
    pub fn from_times(times_ms: Vec<f64>) -> Self {
        let q = |p| {
            if times_ms.is_empty() {
                0.0
            } else {
                quantile(&times_ms, p)
            }
        };
        Self {
            count: times_ms.len() as u32,
            response_bytes: RESPONSE_BYTES,
            median_ms: q(0.5),
            p90_ms: q(0.9),
            min_ms: times_ms.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: times_ms.iter().copied().fold(0.0, f64::max),
            times_ms,
        }
    }
}

/// Checks a received response against the expected body.
pub fn verify(got: &[u8], expected: &[u8]) -> Result<(), String> {
    if got.len() != expected.len() {
        return Err(format!(
            "got {} bytes, expected exactly {}",
            got.len(),
            expected.len()
        ));
    }
    match got.iter().zip(expected).position(|(a, b)| a != b) {
        Some(off) => Err(format!("payload differs at byte {off}")),
        None => Ok(()),
    }
}

fn request_once(
    connect: SocketAddr,
    cc: Option<&str>,
    expected: &[u8],
    buf: &mut Vec<u8>,
) -> Result<f64, BenchError> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&connect, IO_TIMEOUT)
        .map_err(io(format!("connect {connect}")))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io("set timeout"))?;
    stream.set_nodelay(true).map_err(io("set nodelay"))?;
    if let Some(cc) = cc {
        set_congestion(&stream, cc)?;
    }
    stream.write_all(REQUEST).map_err(io("send request"))?;
    buf.clear();
    // Read one byte past the expected size so an overlong reply is seen, not truncated.
    (&mut stream)
        .take(expected.len() as u64 + 1)
        .read_to_end(buf)
        .map_err(io("read response"))?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    verify(buf, expected).map_err(|detail| BenchError::Failed {
        tool: "rr-client",
        detail,
    })?;
    Ok(elapsed_ms)
}

/// Makes `count` sequential requests; any failed or wrong response fails the run.
pub fn client(connect: SocketAddr, count: u32, cc: Option<&str>) -> Result<RrReport, BenchError> {
    if count == 0 || count > MAX_COUNT {
        return Err(BenchError::Failed {
            tool: "rr-client",
            detail: format!("count must be 1..={MAX_COUNT}"),
        });
    }
    let expected = payload();
    let mut buf = Vec::with_capacity(RESPONSE_BYTES + 1);
    let mut times = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t = request_once(connect, cc, &expected, &mut buf).map_err(|e| BenchError::Failed {
            tool: "rr-client",
            detail: format!(
                "request {} of {count} to {connect}: {}",
                i + 1,
                error_chain(&e)
            ),
        })?;
        times.push(t);
    }
    Ok(RrReport::from_times(times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_fixed_and_not_trivially_compressible() {
        let a = payload();
        assert_eq!(a.len(), RESPONSE_BYTES);
        assert_eq!(a, payload());
        // Every byte value appears, roughly uniformly.
        let mut hist = [0u32; 256];
        for &b in &a {
            hist[b as usize] += 1;
        }
        let (lo, hi) = (hist.iter().min().unwrap(), hist.iter().max().unwrap());
        assert!(*lo > 3500 && *hi < 4700, "{lo} {hi}");
    }

    #[test]
    fn verify_catches_short_long_and_corrupt() {
        let p = payload();
        assert!(verify(&p, &p).is_ok());
        assert!(verify(&p[..p.len() - 1], &p).is_err());
        let mut long = p.clone();
        long.push(0);
        assert!(verify(&long, &p).is_err());
        let mut bad = p.clone();
        bad[12345] ^= 1;
        assert_eq!(
            verify(&bad, &p),
            Err("payload differs at byte 12345".into())
        );
    }

    #[test]
    fn report_quantiles() {
        let r = RrReport::from_times((1..=20).map(f64::from).collect());
        assert_eq!(r.count, 20);
        assert_eq!(r.median_ms, 10.0);
        assert_eq!(r.p90_ms, 18.0);
        assert_eq!((r.min_ms, r.max_ms), (1.0, 20.0));
    }

    #[test]
    fn loopback_round_trip() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || serve_on(l, None, Some(3)));
        let report = client(addr, 3, None).unwrap();
        assert_eq!(report.count, 3);
        srv.join().unwrap().unwrap();
    }

    #[test]
    fn server_rejects_a_bad_request() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || serve_on(l, None, Some(1)));
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\n").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        srv.join().unwrap().unwrap();
    }
}
