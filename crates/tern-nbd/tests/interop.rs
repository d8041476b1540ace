//! The server against the real QEMU 7.2 NBD client (qemu-img, qemu-io, qemu-nbd --list),
//! in-process on a unix socket, backed by sparse files. Skipped (with a message) when
//! qemu-img is not installed.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tern_nbd::proto::MAX_OPTION_BYTES;
use tern_nbd::wire::*;
use tern_nbd::{Backend, Export, FileBackend, LocalAddr, Server, ServerHandle};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 8 * MIB;
/// Seconds any QEMU tool may take before the test fails instead of hanging.
const TOOL_TIMEOUT_S: &str = "120";

fn qemu_available() -> bool {
    let found = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipping: qemu-img is not installed");
    }
    found
}

/// A server on a unix socket in a fresh temp dir, exporting "disk" (writable, sparse) and
/// "ro" (read-only, filled with 0x5a).
struct Fixture {
    dir: PathBuf,
    disk: PathBuf,
    server: Option<ServerHandle>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tern-nbd-interop-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        let ro = dir.join("ro.raw");
        std::fs::write(&ro, vec![0x5a; MIB as usize]).unwrap();
        let exports = vec![
            Export {
                name: "disk".into(),
                description: "writable sparse disk".into(),
                backend: Arc::new(FileBackend::open(&disk, false).unwrap()),
            },
            Export::new("ro", Arc::new(FileBackend::open(&ro, true).unwrap())),
        ];
        let server = Server::bind_unix(dir.join("nbd.sock"), exports)
            .unwrap()
            .spawn()
            .unwrap();
        Fixture {
            dir,
            disk,
            server: Some(server),
        }
    }

    fn server(&self) -> &ServerHandle {
        self.server.as_ref().unwrap()
    }

    fn socket(&self) -> PathBuf {
        match self.server().local_addr() {
            LocalAddr::Unix(path) => path.clone(),
            LocalAddr::Tcp(addr) => panic!("unix server on {addr}"),
        }
    }

    fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(self.socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let stats = server.stop();
            println!("server stats: {stats:?}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a QEMU tool under `timeout`; panics with its output unless it succeeds.
fn run(tool: &str, args: &[&str]) -> String {
    let output = run_status(tool, args);
    let text = describe(&output);
    assert!(output.status.success(), "{tool} {args:?} failed:\n{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn run_status(tool: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(TOOL_TIMEOUT_S)
        .arg(tool)
        .args(args)
        .output()
        .unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn qemu_img_info_and_qemu_nbd_list() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("info");
    let info = run("qemu-img", &["info", "--output=json", &f.url("disk")]);
    assert!(
        info.contains(&format!("\"virtual-size\": {DISK_BYTES}")),
        "{info}"
    );
    let info = run("qemu-img", &["info", &f.url("")]);
    assert!(
        info.contains("8 MiB"),
        "empty name is the first export: {info}"
    );

    let list = run("qemu-nbd", &["--list", "-k", f.socket().to_str().unwrap()]);
    assert!(list.contains("exports available: 2"), "{list}");
    assert!(
        list.contains("export: 'disk'") && list.contains("writable sparse disk"),
        "{list}"
    );
    assert!(list.contains("export: 'ro'"), "{list}");
    assert!(list.contains("max block: 33554432"), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
}

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("io");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 2M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -P 0xef -f 3M 4k",
            "-c",
            "write -z -u 4M 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "flush",
            &f.url("disk"),
        ],
    );
    for bad in ["error", "failed", "Pattern verification"] {
        assert!(!out.contains(bad), "{out}");
    }
    let bytes = read_file(&f.disk);
    assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        bytes[MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "zeroed and discarded"
    );
    assert!(
        bytes[3 * MIB as usize..][..4096].iter().all(|&b| b == 0xef),
        "FUA write"
    );
    let backend = FileBackend::open(&f.disk, true).unwrap();
    let extents = backend.block_status(2 * MIB, MIB).unwrap();
    assert!(
        extents.iter().all(|e| e.hole),
        "discard punched a hole: {extents:?}"
    );
    let stats = f.server().stats();
    assert!(
        stats.requests >= 7 && stats.bytes_written >= 3 * MIB && stats.errors == 0,
        "{stats:?}"
    );
}

#[test]
fn qemu_img_map_sees_holes_and_data() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("map");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.disk)
        .unwrap();
    file.write_all_at(&vec![1; MIB as usize], 2 * MIB).unwrap();
    file.sync_all().unwrap();
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &f.url("disk")],
    );
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let ranges: Vec<(u64, u64, bool, bool)> = entries
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (0, 2 * MIB, false, true),
            (2 * MIB, MIB, true, false),
            (3 * MIB, 5 * MIB, false, true)
        ],
        "{map}"
    );
}

#[test]
fn qemu_img_convert_out_of_and_into_the_export() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("convert");
    let mut rng = Rng(0x5eed);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.disk)
        .unwrap();
    file.write_all_at(&rng.bytes(MIB as usize), MIB).unwrap();
    file.write_all_at(&rng.bytes(12345), 5 * MIB + 7).unwrap();

    let out = f.dir.join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &f.url("disk"),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        read_file(&out) == read_file(&f.disk),
        "exported bytes differ from the backing file"
    );

    let src = f.dir.join("src.raw");
    let mut data = rng.bytes(DISK_BYTES as usize);
    data[3 * MIB as usize..5 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &f.url("disk"),
        ],
    );
    assert!(
        read_file(&f.disk) == data,
        "imported bytes differ from the source"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("ro");
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &f.url("ro")],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let refused = run_status(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &f.url("ro")],
    );
    assert!(
        !refused.status.success(),
        "write to a read-only export succeeded: {}",
        describe(&refused)
    );
    // Below QEMU's own read-only check: the server answers EPERM itself.
    let mut s = f.connect();
    let reply = go_and_request(&mut s, "ro", &write_request(0, 9, 0, b"x"), 16);
    assert_eq!(reply, simple(9, 1, &[]));
    assert!(
        std::fs::read(f.dir.join("ro.raw"))
            .unwrap()
            .iter()
            .all(|&b| b == 0x5a)
    );
}

/// Negotiates `export` with NBD_OPT_GO (simple replies), sends `request`, and returns the
/// next `reply_len` bytes.
fn go_and_request(s: &mut UnixStream, export: &str, request: &[u8], reply_len: usize) -> Vec<u8> {
    let mut greeting = [0; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&option(OPT_GO, &info_data(export, &[])))
        .unwrap();
    // INFO_EXPORT (20 + 12), INFO_BLOCK_SIZE (20 + 14), ACK (20).
    let mut replies = [0; 86];
    s.read_exact(&mut replies).unwrap();
    assert_eq!(parse_opt_replies(&replies).last().unwrap().1, REP_ACK);
    s.write_all(request).unwrap();
    let mut reply = vec![0; reply_len];
    s.read_exact(&mut reply).unwrap();
    reply
}

/// Reads until the server closes; true if it did (EOF, or a reset because it dropped
/// unread input) rather than leave the client hanging.
fn server_closes(s: &mut UnixStream) -> bool {
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn malformed_clients_do_not_stop_the_server() {
    if !qemu_available() {
        return;
    }
    let f = Fixture::new("malformed");

    let mut s = f.connect();
    s.write_all(&Rng(7).bytes(4096)).unwrap();
    assert!(server_closes(&mut s), "random bytes");

    let mut s = f.connect();
    s.write_all(&[0, 0]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(server_closes(&mut s), "truncated handshake");

    let mut s = f.connect();
    let mut header = (FLAG_C_FIXED_NEWSTYLE).to_be_bytes().to_vec();
    header.extend(option(OPT_GO, &[]));
    header[4 + 12..4 + 16].copy_from_slice(&(MAX_OPTION_BYTES * 16).to_be_bytes());
    s.write_all(&header).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(
        parse_opt_replies(&out[18..])[0].1,
        REP_ERR_TOO_BIG,
        "oversized option"
    );

    let mut s = f.connect();
    let reply = go_and_request(&mut s, "disk", &request(0, CMD_WRITE, 5, 0, u32::MAX), 16);
    assert_eq!(reply, simple(5, 22, &[]));
    assert!(server_closes(&mut s), "oversized write");

    let mut s = f.connect();
    let mut bad = request(0, CMD_READ, 6, 0, 512);
    bad[0] = 0;
    go_and_request(&mut s, "disk", &bad, 0);
    assert!(server_closes(&mut s), "bad request magic");

    let stats = f.server().stats();
    assert_eq!(stats.dropped, 5, "{stats:?}");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "read -P 0x11 0 64k",
            &f.url("disk"),
        ],
    );
    assert_eq!(f.server().stats().dropped, 5);
}

#[test]
fn tcp_listener_serves_qemu() {
    if !qemu_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tern-nbd-interop-{}-tcp.raw", std::process::id()));
    std::fs::File::create(&dir).unwrap().set_len(MIB).unwrap();
    let backend = Arc::new(FileBackend::open(&dir, false).unwrap());
    let server = Server::bind_tcp("127.0.0.1:0", vec![Export::new("disk", backend)])
        .unwrap()
        .spawn()
        .unwrap();
    let LocalAddr::Tcp(addr) = server.local_addr().clone() else {
        panic!("not tcp")
    };
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 4k",
            &format!("nbd://{addr}/disk"),
        ],
    );
    let stats = server.stop();
    assert_eq!(
        (stats.connections, stats.bytes_written),
        (1, 4096),
        "{stats:?}"
    );
    assert!(read_file(&dir)[..4096].iter().all(|&b| b == 0x42));
    std::fs::remove_file(&dir).unwrap();
}

/// A memory backend whose writes take 20 ms and which records how many ran at once.
struct Slow {
    mem: tern_nbd::MemBackend,
    active: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Backend for Slow {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.active.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        self.active.fetch_sub(1, SeqCst);
        self.mem.write_at(offset, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.mem.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.mem.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<tern_nbd::Extent>> {
        self.mem.block_status(offset, len)
    }
}

#[test]
fn requests_in_flight_run_concurrently_and_land_intact() {
    if !qemu_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tern-nbd-conc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let slow = Arc::new(Slow {
        mem: tern_nbd::MemBackend::new(1 << 20, false),
        active: Default::default(),
        most: Default::default(),
    });
    let sock = dir.join("s.sock");
    let server = Server::bind_unix(&sock, vec![Export::new("disk", slow.clone())])
        .unwrap()
        .spawn()
        .unwrap();
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    // qemu-img bench keeps 8 writes of 0xa5 in flight over 64 x 4 KiB.
    run(
        "qemu-img",
        &[
            "bench",
            "-w",
            "-f",
            "raw",
            "-c",
            "64",
            "-d",
            "8",
            "-s",
            "4096",
            "--pattern=165",
            &url,
        ],
    );
    let most = slow.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most >= 2,
        "writes ran one at a time (at most {most} at once)"
    );
    let contents = slow.mem.contents();
    assert!(contents[..64 * 4096].iter().all(|&b| b == 0xa5));
    assert!(contents[64 * 4096..].iter().all(|&b| b == 0));
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
