//! A client that pipelines writes faster than the backend completes them is held at its
//! socket: the server buffers at most `proto::MAX_BUFFERED_INPUT_BYTES` of its input (plus
//! the requests in flight), not everything it sends.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tern_nbd::proto::{MAX_BUFFERED_INPUT_BYTES, MAX_IN_FLIGHT};
use tern_nbd::wire::*;
use tern_nbd::{Backend, Export, MemBackend, Server};

/// Writes block until `open`.
struct Held {
    mem: MemBackend,
    open: Mutex<bool>,
    cond: Condvar,
}

impl Held {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

impl Backend for Held {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
        drop(open);
        self.mem.write_at(offset, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.mem.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, may_trim: bool, fua: bool) -> std::io::Result<()> {
        self.mem.write_zeroes(o, l, may_trim, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<tern_nbd::Extent>> {
        self.mem.block_status(offset, len)
    }
}

#[test]
fn a_client_that_outruns_the_backend_is_held_at_its_socket() {
    let dir = std::env::temp_dir().join(format!("tern-nbd-bp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let held = Arc::new(Held {
        mem: MemBackend::new(1 << 20, false),
        open: Mutex::new(false),
        cond: Condvar::new(),
    });
    let sock = dir.join("s.sock");
    let server = Server::bind_unix(&sock, vec![Export::new("disk", held.clone())])
        .unwrap()
        .spawn()
        .unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut greeting = [0; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&option(OPT_GO, &info_data("disk", &[])))
        .unwrap();
    let mut replies = [0; 86];
    s.read_exact(&mut replies).unwrap();
    // Pipeline 64 KiB writes without reading a reply, until the server stops taking them.
    const WRITE: usize = 64 << 10;
    const ATTEMPT: usize = 256 << 20;
    let req = write_request(0, 1, 0, &[0xa5; WRITE]);
    s.set_nonblocking(true).unwrap();
    let (mut sent, mut at, mut stalled_since) = (0usize, 0usize, None::<Instant>);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < ATTEMPT && Instant::now() < deadline {
        match s.write(&req[at..]) {
            Ok(n) => {
                sent += n;
                at = (at + n) % req.len();
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let t = *stalled_since.get_or_insert_with(Instant::now);
                if t.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // In flight (handed to workers), parsed-but-waiting, buffered, and socket buffers.
    let bound = MAX_IN_FLIGHT * req.len() + MAX_BUFFERED_INPUT_BYTES + (8 << 20);
    // Released (before asserting, so a failing run does not hang in the server's drop),
    // every write completes: the client reads its replies.
    held.release();
    assert!(
        sent <= bound,
        "the server took {sent} bytes of input while its backend completed nothing \
         (bound {bound})"
    );
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let whole = sent / req.len();
    let mut reply = vec![0; whole * 16];
    s.read_exact(&mut reply).unwrap();
    assert!(reply.chunks(16).all(|r| r == simple(1, 0, &[])));
    drop(s);
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
