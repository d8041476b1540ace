//! The `tern-guest` driver: fills the data area, then one thread alternates paced writes
//! with verification slices forever; two listener threads serve echo and `/status`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tern_guest::rng::Rng;
use tern_guest::service::{self, Shared};
use tern_guest::store::{BLOCK_BYTES, Verifier};
use tern_guest::workload::{Pacer, Workload};
use tern_guest::{Config, USAGE, mem_available_mb, parse_args, plan_mem_mb};

/// Records checked per verification slice (1 MiB): short enough that paced writes are not
/// held up by more than a few milliseconds under TCG.
const VERIFY_SLICE_RECORDS: usize = 256;
/// Sleep bounds of the workload loop when neither a write nor a pass is due.
const MIN_SLEEP: Duration = Duration::from_millis(2);
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Check-before-write failures printed per pass (all are counted).
const MAX_WRITE_FAIL_LINES_PER_PASS: u32 = 8;
/// Concurrent connections per TCP service; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
const CONN_THREAD_STACK_BYTES: usize = 128 * 1024;
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tern-guest: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    run(cfg)
}

fn run(cfg: Config) -> ExitCode {
    let started = Instant::now();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_available_mb(&m));
    let (mem_mb, clamped) = plan_mem_mb(cfg.mem_mb, available);
    if let Some(why) = clamped {
        println!("tern-guest: warning {why}");
    }
    let shared = Arc::new(Shared::new(cfg.profile.name(), mem_mb));
    listen("echo", cfg.echo_port, {
        let active = Arc::new(AtomicUsize::new(0));
        move |s| serve_bounded(&active, s, echo)
    });
    listen("http", cfg.http_port, {
        let active = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&shared);
        move |s| {
            let shared = Arc::clone(&shared);
            serve_bounded(&active, s, move |s| http(s, &shared, started))
        }
    });

    if let Some(dev) = &cfg.kv_device {
        match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            Ok(f) => {
                let disk = Arc::new(f);
                let active = Arc::new(AtomicUsize::new(0));
                listen("kv", tern_guest::kv::PORT, move |s| {
                    let disk = Arc::clone(&disk);
                    serve_bounded(&active, s, move |s| kv(s, &disk))
                });
                println!(
                    "tern-guest: kv serving port={} device={dev}",
                    tern_guest::kv::PORT
                );
            }
            Err(e) => println!("tern-guest: warning kv device {dev}: {e}"),
        }
    }
    if let Some(db) = cfg.frontend.clone() {
        let calls = cfg.frontend_calls;
        let active = Arc::new(AtomicUsize::new(0));
        listen("frontend", tern_guest::kv::PORT, move |s| {
            let db = db.clone();
            serve_bounded(&active, s, move |s| frontend(s, &db, calls))
        });
        println!(
            "tern-guest: frontend serving port={} db={} calls={calls}",
            tern_guest::kv::PORT,
            cfg.frontend.as_deref().unwrap_or("")
        );
    }
    println!(
        "tern-guest: config workload={} mem_mb={} rate_mbps={} seed={} verify_interval_ms={}",
        cfg.profile.name(),
        mem_mb,
        cfg.rate_mbps,
        cfg.seed,
        cfg.verify_interval_ms
    );
    let blocks = (mem_mb as usize) * (1 << 20) / BLOCK_BYTES;
    let mut workload = Workload::new(cfg.profile, blocks, cfg.seed);
    let fill_start = Instant::now();
    let mut store = workload.build_store();
    println!(
        "tern-guest: filled records={} bytes={} fill_ms={}",
        blocks,
        store.bytes(),
        fill_start.elapsed().as_millis()
    );
    shared.records.store(blocks as u64, Ordering::Release);
    shared.ready.store(true, Ordering::Release);
    println!(
        "tern-guest: ready workload={} mem_mb={} ip={}",
        cfg.profile.name(),
        mem_mb,
        cfg.ip
    );

    let loop_start = Instant::now();
    let interval = Duration::from_millis(cfg.verify_interval_ms);
    let mut pacer = Pacer::new(cfg.rate_mbps);
    let mut verifier = Verifier::new();
    let mut pass_started = Duration::ZERO;
    let mut next_pass_at = Duration::ZERO;
    let mut write_fail_lines = 0;
    let mut inject_at = cfg.inject_corruption_s.map(Duration::from_secs);
    loop {
        let now = loop_start.elapsed();
        let due = pacer.due(now.as_nanos() as u64);
        for _ in 0..due {
            if let Err(c) = workload.touch(&mut store, started.elapsed().as_secs()) {
                shared.failures.fetch_add(1, Ordering::AcqRel);
                if write_fail_lines < MAX_WRITE_FAIL_LINES_PER_PASS {
                    write_fail_lines += 1;
                    println!(
                        "tern-guest: verify FAIL pass={} {c} at=write",
                        verifier.passes_done() + 1
                    );
                }
            }
        }
        shared.touched_pages.fetch_add(due, Ordering::AcqRel);

        if inject_at.is_some_and(|at| now >= at) {
            inject_at = None;
            let offset = Rng::new(now.as_nanos() as u64).below(store.bytes() as usize);
            store.corrupt_byte(offset, 0x01);
            println!(
                "tern-guest: injected corruption record={} offset={offset}",
                offset / BLOCK_BYTES
            );
        }

        if verifier.in_pass() || now >= next_pass_at {
            if !verifier.in_pass() {
                pass_started = now;
            }
            if let Some(r) = verifier.step(&store, VERIFY_SLICE_RECORDS) {
                for c in &r.reports {
                    println!("tern-guest: verify FAIL pass={} {c}", r.pass);
                }
                if r.ok() {
                    println!(
                        "tern-guest: verify ok pass={} records={} bytes={}",
                        r.pass, r.records, r.bytes
                    );
                } else {
                    println!(
                        "tern-guest: verify FAIL pass={} bad_records={} records={}",
                        r.pass, r.bad, r.records
                    );
                    shared.failures.fetch_add(r.bad, Ordering::AcqRel);
                }
                shared.pass.store(r.pass, Ordering::Release);
                next_pass_at = pass_started + interval;
                write_fail_lines = 0;
            }
            continue;
        }
        let until_write = pacer
            .next_due_in_ns()
            .map_or(MAX_SLEEP, Duration::from_nanos);
        let until_pass = next_pass_at.saturating_sub(now);
        std::thread::sleep(until_write.min(until_pass).clamp(MIN_SLEEP, MAX_SLEEP));
    }
}

/// Accepts on 0.0.0.0:`port` in a thread, handing each connection to `handle`. A port that
/// cannot be bound is reported and skipped: the workload matters more than the service.
/// Commits are serialized, as by a database's single log writer: one write + fdatasync at a
/// time. (With synchronous replication every commit then costs a round trip for everyone:
/// the case PipeCloud was built for.)
static KV_COMMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One key-value connection: each `PUT <id>` line is written, made durable, then answered.
fn kv(s: TcpStream, disk: &std::fs::File) {
    use std::io::BufRead;
    use std::os::unix::fs::FileExt;
    let _ = s.set_nodelay(true);
    let Ok(mut out) = s.try_clone() else { return };
    let size = disk.metadata().map(|m| m.len()).unwrap_or(0);
    let size = if size == 0 {
        // A block device reports 0 in metadata: ask it for its end.
        use std::io::Seek;
        let mut d: &std::fs::File = disk;
        d.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
    } else {
        size
    };
    let slots = size / tern_guest::kv::RECORD_BYTES as u64;
    for line in std::io::BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let reply = match tern_guest::kv::parse_put(&line) {
            Some(id) if id < slots => {
                let rec = tern_guest::kv::record(id);
                let at = id * tern_guest::kv::RECORD_BYTES as u64;
                let commit = KV_COMMIT.lock().unwrap_or_else(|p| p.into_inner());
                let done = disk.write_all_at(&rec, at).and_then(|()| disk.sync_data());
                drop(commit);
                match done {
                    Ok(()) => format!("OK {id}\n"),
                    Err(e) => format!("ERR {id} {e}\n"),
                }
            }
            Some(id) => format!("ERR {id} beyond {slots} records\n"),
            None => "ERR bad request\n".to_string(),
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One front-end connection: each `PUT <id>` becomes `calls` sequential PUTs to the
/// key-value service at `db` over this connection's own database connection; the reply is
/// `OK <id>` once all are acknowledged.
fn frontend(s: TcpStream, db: &str, calls: u32) {
    use std::io::{BufRead, BufReader};
    let _ = s.set_nodelay(true);
    let Ok(mut out) = s.try_clone() else { return };
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let reply = match tern_guest::kv::parse_put(&line) {
            Some(id) => {
                let mut err = None;
                for k in tern_guest::kv::tier_ids(id, calls) {
                    if conn.is_none() {
                        conn = TcpStream::connect(db).ok().and_then(|c| {
                            let _ = c.set_nodelay(true);
                            let r = BufReader::new(c.try_clone().ok()?);
                            Some((c, r))
                        });
                    }
                    let Some((w, r)) = conn.as_mut() else {
                        err = Some(format!("database {db} unreachable"));
                        break;
                    };
                    let mut answer = String::new();
                    let ok = w.write_all(format!("PUT {k}\n").as_bytes()).is_ok()
                        && r.read_line(&mut answer).is_ok_and(|n| n > 0);
                    if !ok || !answer.starts_with("OK") {
                        conn = None;
                        err = Some(format!("database: {}", answer.trim()));
                        break;
                    }
                }
                match err {
                    None => format!("OK {id}\n"),
                    Some(e) => format!("ERR {id} {e}\n"),
                }
            }
            None => "ERR bad request\n".to_string(),
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn listen(name: &'static str, port: u16, handle: impl Fn(TcpStream) + Send + 'static) {
    let listener = match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            println!("tern-guest: warning {name} service not listening on port {port}: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => handle(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    if let Err(e) = spawned {
        println!("tern-guest: warning {name} service thread: {e}");
    }
}

/// Runs `serve` on its own thread unless [`MAX_CONNECTIONS`] are already open.
fn serve_bounded(
    active: &Arc<AtomicUsize>,
    stream: TcpStream,
    serve: impl FnOnce(TcpStream) + Send + 'static,
) {
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        return; // dropping the stream closes it
    }
    let active2 = Arc::clone(active);
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(CONN_THREAD_STACK_BYTES)
        .spawn(move || {
            serve(stream);
            active2.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn http(mut s: TcpStream, shared: &Shared, started: Instant) {
    let _ = s.set_read_timeout(Some(HTTP_READ_TIMEOUT));
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let route = loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break service::route(&head),
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                if service::head_complete(&head) {
                    break service::route(&head);
                }
                if head.len() > service::MAX_REQUEST_BYTES {
                    break service::Route::BadRequest;
                }
            }
        }
    };
    let body = shared.status_json(started.elapsed().as_secs_f64());
    let _ = s.write_all(&service::response(route, &body));
    let _ = s.shutdown(std::net::Shutdown::Both);
}
