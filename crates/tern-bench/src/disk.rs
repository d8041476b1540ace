//! `tern bench disk`: a guest disk across the lab's WAN, tern vs QEMU's own mirror.
//!
//! One run, side by side, on one volume (ext4 with real files from this machine, one
//! directory copied twice):
//! 1. **QEMU baseline**: a QEMU at site a with the volume as its disk runs
//!    `blockdev-mirror sync=full` into `qemu-nbd` at site b over plain TCP on the same
//!    emulated link (kernel congestion control as the sites have it); bytes on the link and
//!    time to `BLOCK_JOB_READY`; the copy is compared with the source.
//! 2. **tern initial sync** of the same volume into an empty one at site b, through the
//!    nodes; same measures; compared.
//! 3. **Guest write latency** (`qemu-img bench`, 4 KiB writes at queue depth 1 through
//!    tern's NBD server) with no replication, async and sync replication, on each latency
//!    profile.
//! 4. **Re-sync after a day-like workload** (real text written over 1% of the volume's data
//!    chunks plus an appended log), replication stopped meanwhile; bytes vs the full sync.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::BenchError;
use crate::accel::run_bounded;
use crate::vmotion::ok_or_fail;

#[derive(Debug, Clone)]
pub struct DiskBenchOptions {
    pub tern_exe: PathBuf,
    pub out_dir: PathBuf,
    pub work_dir: PathBuf,
    pub size_mib: u64,
    /// Directories copied into the volume's filesystem (missing ones are skipped); the first
    /// is copied a second time (duplicates).
    pub sources: Vec<PathBuf>,
    pub sync_profile: String,
    pub latency_profiles: Vec<String>,
    pub latency_writes: u32,
    pub seed: u64,
    pub command: String,
}

impl DiskBenchOptions {
    pub fn new(tern_exe: PathBuf, out_dir: PathBuf) -> DiskBenchOptions {
        DiskBenchOptions {
            tern_exe,
            out_dir,
            work_dir: PathBuf::from("/var/tmp/tern-bench-disk"),
            size_mib: 2048,
            sources: ["/usr/share/doc", "/usr/bin", "/usr/share/man"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            sync_profile: "cloudnet-lab".into(),
            latency_profiles: vec!["cloudnet-wan".into(), "dr-50".into()],
            latency_writes: 200,
            seed: 1,
            command: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub what: String,
    /// Both directions (data one way, acknowledgements and hash lists the other).
    pub wire_bytes: u64,
    pub forward_bytes: u64,
    pub reverse_bytes: u64,
    pub seconds: f64,
    pub identical: bool,
    /// tern only: replication stream bytes and the primary's counters.
    pub stream_bytes: Option<u64>,
    pub stats: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub profile: String,
    pub mode: String,
    /// Writes in flight.
    pub depth: u32,
    pub writes: u32,
    /// Wall time per write: the latency at depth 1, the inverse throughput above.
    pub mean_ms: f64,
    pub writes_per_s: f64,
}

const NBD_PORT: u16 = 7460;
const VM: &str = "bench-dq";
const REPL_DIR: &str = "/run/tern/vm/bench-disk";

fn fail(tool: &'static str, detail: impl Into<String>) -> BenchError {
    BenchError::Failed {
        tool,
        detail: detail.into(),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

struct Ctx<'a> {
    o: &'a DiskBenchOptions,
    children: Vec<Child>,
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run_bounded(
            self.tern().args(["vm", "stop", VM]),
            Duration::from_secs(60),
        );
    }
}

impl Ctx<'_> {
    fn tern(&self) -> Command {
        Command::new(&self.o.tern_exe)
    }

    fn tern_ok(&self, args: &[&str], timeout_s: u64) -> Result<String, BenchError> {
        let out = run_bounded(self.tern().args(args), Duration::from_secs(timeout_s))?;
        ok_or_fail(out, &args.join(" "))
    }

    /// A new empty volume of the bench's size.
    fn empty_volume(&self, path: &Path) -> Result<(), BenchError> {
        let size = format!("{}M", self.o.size_mib);
        self.tern_ok(
            &[
                "disk",
                "create",
                path.to_str().unwrap_or(""),
                "--size",
                &size,
            ],
            30,
        )
        .map(|_| ())
    }

    fn ctl(&self, control: &Path, words: &[&str]) -> Result<Value, BenchError> {
        let mut args = vec!["disk", "ctl", control.to_str().unwrap_or("")];
        args.extend_from_slice(words);
        let s = self.tern_ok(&args, 30)?;
        serde_json::from_str(&s).map_err(|e| fail("tern disk ctl", e.to_string()))
    }

    fn serve(&mut self, args: &[&str], log: &Path) -> Result<(), BenchError> {
        let child = self
            .tern()
            .args(["disk", "serve"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).map_err(io(format!("create {}", log.display())))?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawn tern disk serve".into()))?;
        self.children.push(child);
        Ok(())
    }

    fn verify(&self, a: &Path, b: &Path) -> Result<bool, BenchError> {
        let out = run_bounded(
            self.tern().args([
                "disk",
                "verify",
                a.to_str().unwrap_or(""),
                b.to_str().unwrap_or(""),
                "--json",
            ]),
            Duration::from_secs(300),
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| fail("tern disk verify", e.to_string()))?;
        Ok(v["equal"] == true)
    }
}

fn wait_path(p: &Path, timeout: Duration) -> Result<(), BenchError> {
    let end = Instant::now() + timeout;
    while !p.exists() {
        if Instant::now() > end {
            return Err(fail(
                "tern disk serve",
                format!("{} did not appear", p.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Bytes on the link in both directions since `start`: (a to b, b to a).
fn since(start: (u64, u64)) -> (u64, u64) {
    let now = tern_lab::offered_bytes();
    (now.0 - start.0, now.1 - start.1)
}

/// Builds the populated volume; returns (data bytes copied, files).
fn build_volume(ctx: &Ctx<'_>, src: &Path) -> Result<Value, BenchError> {
    let o = ctx.o;
    let pop = o.work_dir.join("pop");
    let mut used = Vec::new();
    for (i, s) in o.sources.iter().enumerate() {
        if !s.is_dir() {
            continue;
        }
        let dst = pop.join(format!("src{i}"));
        let st = Command::new("cp")
            .args(["-a"])
            .arg(s)
            .arg(&dst)
            .status()
            .map_err(io("cp".into()))?;
        if !st.success() {
            return Err(fail("cp", format!("copy {}", s.display())));
        }
        used.push(s.display().to_string());
    }
    let first = used
        .first()
        .ok_or_else(|| fail("bench disk", "no source directory exists"))?;
    // The duplicate: the first directory again (a backup copy, a second checkout).
    let st = Command::new("cp")
        .args(["-a"])
        .arg(pop.join("src0"))
        .arg(pop.join("copy-of-src0"))
        .status()
        .map_err(io("cp".into()))?;
    if !st.success() {
        return Err(fail("cp", "duplicate"));
    }
    let size = format!("{}M", o.size_mib);
    ctx.tern_ok(
        &[
            "disk",
            "create",
            src.to_str().unwrap_or(""),
            "--size",
            &size,
            "--mkfs",
            "--populate",
            pop.to_str().unwrap_or(""),
        ],
        600,
    )?;
    let _ = std::fs::remove_dir_all(&pop);
    let info: Value = serde_json::from_str(
        &ctx.tern_ok(&["disk", "info", src.to_str().unwrap_or(""), "--json"], 300)?,
    )
    .map_err(|e| fail("tern disk info", e.to_string()))?;
    Ok(json!({
        "sources": used,
        "duplicated": first,
        "size": info["size"],
        "allocated_bytes": info["allocated_bytes"],
        "data_blocks": info["data_blocks"],
    }))
}

fn qemu_mirror(ctx: &mut Ctx<'_>, src: &Path) -> Result<Transfer, BenchError> {
    let o = ctx.o;
    let dst = o.work_dir.join("qemu-dst.img");
    ctx.empty_volume(&dst)?;
    let nbd = tern_lab::netns_command("tern-b", "qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-t", "-b", "198.18.2.1", "-p"])
        .arg(NBD_PORT.to_string())
        .arg(&dst)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start qemu-nbd".into()))?;
    ctx.children.push(nbd);
    std::thread::sleep(Duration::from_millis(500));
    ctx.tern_ok(
        &[
            "vm",
            "start",
            VM,
            "--site",
            "a",
            "--mem",
            "256",
            "--workload",
            "none",
            "--no-net",
            "--disk",
            src.to_str().unwrap_or(""),
        ],
        120,
    )?;
    let qmp = Path::new(tern_lab::VM_DIR)
        .join(VM)
        .join("a")
        .join("qmp.sock");
    let mut q = tern_vm::QmpClient::connect(&qmp, Duration::from_secs(10))
        .map_err(|e| fail("qmp", e.to_string()))?;
    let qe = |e: tern_vm::ClientError| fail("qmp", e.to_string());
    q.set_command_timeout(Duration::from_secs(60));
    q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "export": "disk",
               "server": {"type": "inet", "host": "198.18.2.1", "port": NBD_PORT.to_string()}}),
    )
    .map_err(qe)?;
    let wire0 = tern_lab::offered_bytes();
    let t0 = Instant::now();
    q.execute(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "d0", "target": "tgt", "sync": "full"}),
    )
    .map_err(qe)?;
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(1800))
        .map_err(qe)?;
    let seconds = t0.elapsed().as_secs_f64();
    let (forward_bytes, reverse_bytes) = since(wire0);
    q.execute("block-job-cancel", json!({"device": "m"}))
        .map_err(qe)?;
    let _ = q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60));
    drop(q);
    ctx.tern_ok(&["vm", "stop", VM], 60)?;
    for mut c in ctx.children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let identical = ctx.verify(src, &dst)?;
    let _ = std::fs::remove_file(&dst);
    Ok(Transfer {
        what: "QEMU blockdev-mirror (sync=full) into qemu-nbd over TCP".into(),
        wire_bytes: forward_bytes + reverse_bytes,
        forward_bytes,
        reverse_bytes,
        seconds,
        identical,
        stream_bytes: None,
        stats: None,
    })
}

struct Servers {
    prim_ctl: PathBuf,
    prim_nbd: PathBuf,
    sec_ctl: PathBuf,
}

fn start_servers(ctx: &mut Ctx<'_>, src: &Path, dst: &Path) -> Result<Servers, BenchError> {
    let dir = Path::new(REPL_DIR).join("b");
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let w = ctx.o.work_dir.clone();
    let s = |p: &Path| p.to_str().unwrap_or("").to_string();
    let sv = Servers {
        prim_ctl: w.join("prim-ctl.sock"),
        prim_nbd: w.join("prim-nbd.sock"),
        sec_ctl: dir.join("ctl.sock"),
    };
    ctx.serve(
        &[
            "--nbd",
            &s(&dir.join("nbd.sock")),
            "--control",
            &s(&sv.sec_ctl),
            "--secondary",
            "--listen",
            &s(&dir.join("repl.sock")),
            &s(dst),
        ],
        &w.join("secondary.log"),
    )?;
    ctx.serve(
        &[
            "--nbd",
            &s(&sv.prim_nbd),
            "--control",
            &s(&sv.prim_ctl),
            "--mode",
            "async",
            &s(src),
        ],
        &w.join("primary.log"),
    )?;
    wait_path(&sv.sec_ctl, Duration::from_secs(10))?;
    wait_path(&sv.prim_ctl, Duration::from_secs(10))?;
    Ok(sv)
}

/// Replicates until in sync (backlog drained); returns (seconds, link bytes both ways,
/// status).
fn replicate(
    ctx: &Ctx<'_>,
    sv: &Servers,
    mode: &str,
) -> Result<(f64, (u64, u64), Value), BenchError> {
    let wire0 = tern_lab::offered_bytes();
    let t0 = Instant::now();
    ctx.ctl(
        &sv.prim_ctl,
        &[
            "replicate",
            tern_lab::migrate_socket("a").to_str().unwrap_or(""),
            "site-b",
            "bench-disk/b/repl.sock",
            mode,
        ],
    )?;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let st = ctx.ctl(&sv.prim_ctl, &["status"])?;
        if st["in_sync"] == true && st["backlog_bytes"] == 0 {
            return Ok((t0.elapsed().as_secs_f64(), since(wire0), st));
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            return Err(fail("tern disk", format!("no sync in 30 min: {st}")));
        }
    }
}

fn stop_replication(ctx: &Ctx<'_>, sv: &Servers) -> Result<(), BenchError> {
    ctx.ctl(&sv.prim_ctl, &["stop-replication"])?;
    let end = Instant::now() + Duration::from_secs(10);
    while ctx.ctl(&sv.sec_ctl, &["status"])?["secondary_session"] == true {
        if Instant::now() > end {
            return Err(fail("tern disk", "the secondary's session did not end"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Mean ms per write of `n` 4 KiB writes with `depth` in flight (at depth 1: the latency).
fn write_latency(ctx: &Ctx<'_>, sv: &Servers, n: u32, depth: u32) -> Result<f64, BenchError> {
    let uri = format!("nbd+unix:///disk?socket={}", sv.prim_nbd.display());
    let out = run_bounded(
        Command::new("qemu-img").args([
            "bench",
            "-w",
            "-f",
            "raw",
            "-t",
            "none",
            "-c",
            &n.to_string(),
            "-d",
            &depth.to_string(),
            "-s",
            "4096",
            "-S",
            "8192",
            "-o",
            &format!("{}", (ctx.o.size_mib * 3 / 4) << 20),
            &uri,
        ]),
        Duration::from_secs(900),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|x| x.parse::<f64>().ok())
        })
        .ok_or_else(|| {
            fail(
                "qemu-img bench",
                format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            )
        })?;
    Ok(secs * 1000.0 / f64::from(n))
}

/// A day of changes: real text over 1% of the data chunks (scattered) and 4 MiB appended
/// in one run, written into the volume file while replication is stopped.
fn day_workload(src: &Path, seed: u64) -> Result<u64, BenchError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(src)
        .map_err(io(format!("open {}", src.display())))?;
    // New text the replica has not seen: plain-text files of this machine's documentation
    // (licenses, changelogs, READMEs), up to 32 MiB, read from random places.
    let mut text = Vec::new();
    let mut stack = vec![PathBuf::from("/usr/share/doc")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if text.len() < 32 << 20
                && p.extension()
                    .is_none_or(|e| e != "gz" && e != "xz" && e != "bz2")
            {
                text.extend(std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    if text.len() < 1 << 20 {
        return Err(fail("bench disk", "not enough text under /usr/share/doc"));
    }
    let size = f.metadata().map_err(io("stat".into()))?.len();
    let chunks = size / 4096;
    // Data chunks, found by reading.
    let mut data = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut c = 0;
    while c < chunks {
        match tern_disk::volume::next_data(&f, c * 4096).map_err(io("seek".into()))? {
            None => break,
            Some(d) => c = c.max(d / 4096),
        }
        f.read_exact_at(&mut buf, c * 4096)
            .map_err(io("read".into()))?;
        if buf.iter().any(|&b| b != 0) {
            data.push(c);
        }
        c += 1;
    }
    let mut x = seed | 1;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut written = 0u64;
    for _ in 0..data.len() / 100 {
        let c = data[(rnd() % data.len() as u64) as usize];
        let t = (rnd() % (text.len() as u64 - 4096)) as usize;
        f.write_all_at(&text[t..t + 4096], c * 4096)
            .map_err(io("write".into()))?;
        written += 4096;
    }
    // The log: 4 MiB of text in one run after the last data chunk.
    let log_at = data.last().map_or(0, |&c| c + 1) * 4096;
    let mut off = 0u64;
    while off < 4 << 20 && log_at + off + 4096 <= size {
        let t = (rnd() % (text.len() as u64 - 4096)) as usize;
        f.write_all_at(&text[t..t + 4096], log_at + off)
            .map_err(io("write".into()))?;
        off += 4096;
    }
    written += off;
    f.sync_all().map_err(io("fsync".into()))?;
    Ok(written)
}

pub fn run(o: &DiskBenchOptions) -> Result<Value, BenchError> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&o.work_dir);
    std::fs::create_dir_all(o.work_dir.join("pop"))
        .map_err(io(format!("create {}", o.work_dir.display())))?;
    let mut ctx = Ctx {
        o,
        children: Vec::new(),
    };
    let src = o.work_dir.join("src.img");
    eprintln!(
        "== building the volume ({} MiB, ext4, real files)",
        o.size_mib
    );
    let volume = build_volume(&ctx, &src)?;
    eprintln!("   {volume}");
    let _ = run_bounded(ctx.tern().args(["lab", "down"]), Duration::from_secs(60));
    let seed = o.seed.to_string();
    ctx.tern_ok(
        &["lab", "up", "--profile", &o.sync_profile, "--seed", &seed],
        90,
    )?;

    eprintln!(
        "== QEMU blockdev-mirror into qemu-nbd over TCP ({})",
        o.sync_profile
    );
    let qemu = qemu_mirror(&mut ctx, &src)?;
    eprintln!(
        "   {:.1} MiB on the wire, {:.1} s, identical {}",
        qemu.wire_bytes as f64 / 1048576.0,
        qemu.seconds,
        qemu.identical
    );

    eprintln!("== tern initial sync ({})", o.sync_profile);
    let dst = o.work_dir.join("tern-dst.img");
    ctx.empty_volume(&dst)?;
    let sv = start_servers(&mut ctx, &src, &dst)?;
    let (secs, wire, st) = replicate(&ctx, &sv, "async")?;
    stop_replication(&ctx, &sv)?;
    let tern_sync = Transfer {
        what: "tern initial sync through the nodes".into(),
        wire_bytes: wire.0 + wire.1,
        forward_bytes: wire.0,
        reverse_bytes: wire.1,
        seconds: secs,
        identical: ctx.verify(&src, &dst)?,
        stream_bytes: st["stats"]["bytes_out"].as_u64(),
        stats: Some(st["stats"].clone()),
    };
    eprintln!(
        "   {:.1} MiB on the wire, {:.1} s, identical {}",
        tern_sync.wire_bytes as f64 / 1048576.0,
        tern_sync.seconds,
        tern_sync.identical
    );

    eprintln!("== re-sync after a day-like workload");
    let changed = day_workload(&src, o.seed)?;
    let (secs, wire, st) = replicate(&ctx, &sv, "async")?;
    let resync = Transfer {
        what: format!(
            "tern re-sync after {:.1} MiB of changes",
            changed as f64 / 1048576.0
        ),
        wire_bytes: wire.0 + wire.1,
        forward_bytes: wire.0,
        reverse_bytes: wire.1,
        seconds: secs,
        identical: {
            stop_replication(&ctx, &sv)?;
            ctx.verify(&src, &dst)?
        },
        stream_bytes: st["stats"]["bytes_out"]
            .as_u64()
            .zip(
                tern_sync
                    .stats
                    .as_ref()
                    .and_then(|s| s["bytes_out"].as_u64()),
            )
            .map(|(a, b)| a - b),
        stats: Some(st["stats"].clone()),
    };
    eprintln!(
        "   {:.2} MiB on the wire ({:.1}% of the full sync), identical {}",
        resync.wire_bytes as f64 / 1048576.0,
        100.0 * resync.wire_bytes as f64 / tern_sync.wire_bytes.max(1) as f64,
        resync.identical
    );

    eprintln!("== guest write latency (qemu-img bench, 4 KiB, depth 1)");
    let mut lat = Vec::new();
    let local = write_latency(&ctx, &sv, o.latency_writes * 5, 1)?;
    lat.push(Latency {
        profile: "-".into(),
        mode: "no replication".into(),
        depth: 1,
        writes: o.latency_writes * 5,
        mean_ms: local,
        writes_per_s: 1000.0 / local,
    });
    eprintln!("   no replication: {local:.3} ms");
    for p in &o.latency_profiles {
        ctx.tern_ok(&["lab", "set", "--profile", p], 30)?;
        replicate(&ctx, &sv, "async")?;
        for (mode, depth) in [("async", 1), ("sync", 1), ("sync", 16)] {
            ctx.ctl(&sv.prim_ctl, &["mode", mode])?;
            let n = if mode == "sync" && depth == 1 {
                o.latency_writes
            } else {
                o.latency_writes * 5
            };
            let ms = write_latency(&ctx, &sv, n, depth)?;
            eprintln!("   {p} {mode} depth {depth}: {ms:.3} ms per write");
            lat.push(Latency {
                profile: p.clone(),
                mode: mode.into(),
                depth,
                writes: n,
                mean_ms: ms,
                writes_per_s: 1000.0 / ms,
            });
        }
        stop_replication(&ctx, &sv)?;
        ctx.ctl(&sv.prim_ctl, &["mode", "async"])?;
    }
    ctx.ctl(&sv.prim_ctl, &["shutdown"])?;
    ctx.ctl(&sv.sec_ctl, &["shutdown"])?;
    drop(ctx);
    let _ = std::fs::remove_dir_all(REPL_DIR);
    let _ = std::fs::remove_dir_all(&o.work_dir);
    let _ = run_bounded(
        Command::new(&o.tern_exe).args(["lab", "down"]),
        Duration::from_secs(60),
    );

    let ratio_initial = tern_sync.wire_bytes as f64 / qemu.wire_bytes.max(1) as f64;
    let ratio_resync = resync.wire_bytes as f64 / tern_sync.wire_bytes.max(1) as f64;
    let targets = json!([
        {"target": "initial sync <= 60% of QEMU mirror's bytes", "value": ratio_initial,
         "met": ratio_initial <= 0.60},
        {"target": "re-sync after a small workload < 5% of a full sync", "value": ratio_resync,
         "met": ratio_resync < 0.05},
        {"target": "every copy identical to its source", "value": null,
         "met": qemu.identical && tern_sync.identical && resync.identical},
    ]);
    let v = json!({
        "bench": "disk",
        "command": o.command,
        "machine": crate::machine(),
        "sync_profile": o.sync_profile,
        "volume": volume,
        "qemu_mirror": qemu,
        "tern_sync": tern_sync,
        "tern_resync": resync,
        "latency": lat,
        "targets": targets,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let md = markdown(&v);
    crate::write_results(&o.out_dir, "disk", &v, &md)?;
    print!("{md}");
    Ok(v)
}

fn markdown(v: &Value) -> String {
    let mib = |x: &Value| x.as_f64().unwrap_or(0.0) / 1048576.0;
    let mut s = String::new();
    s.push_str("# tern bench disk\n\n");
    s.push_str(&format!(
        "Command: `{}`\n\n",
        v["command"].as_str().unwrap_or("")
    ));
    s.push_str(&format!(
        "Volume: {} MiB ext4, {} MiB allocated, from {} (the first copied twice). Link for \
         the transfers: `{}`.\n\n",
        v["volume"]["size"].as_u64().unwrap_or(0) >> 20,
        v["volume"]["allocated_bytes"].as_u64().unwrap_or(0) >> 20,
        v["volume"]["sources"],
        v["sync_profile"].as_str().unwrap_or("")
    ));
    s.push_str(
        "| transfer | MiB on the wire (both ways) | forward | reverse | time s | vs QEMU bytes | identical |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    let q = mib(&v["qemu_mirror"]["wire_bytes"]);
    for k in ["qemu_mirror", "tern_sync", "tern_resync"] {
        let t = &v[k];
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1}% | {} |\n",
            t["what"].as_str().unwrap_or(""),
            mib(&t["wire_bytes"]),
            mib(&t["forward_bytes"]),
            mib(&t["reverse_bytes"]),
            t["seconds"].as_f64().unwrap_or(0.0),
            100.0 * mib(&t["wire_bytes"]) / q.max(1e-9),
            t["identical"]
        ));
    }
    s.push_str("\nGuest writes (4 KiB through tern's NBD server, `qemu-img bench`; at depth 1 the time per write is the latency):\n\n");
    s.push_str("| link | replication | in flight | writes | ms per write | writes/s |\n|---|---|---:|---:|---:|---:|\n");
    for l in v["latency"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.0} |\n",
            l["profile"].as_str().unwrap_or(""),
            l["mode"].as_str().unwrap_or(""),
            l["depth"],
            l["writes"],
            l["mean_ms"].as_f64().unwrap_or(0.0),
            l["writes_per_s"].as_f64().unwrap_or(0.0)
        ));
    }
    s.push_str("\nTargets:\n\n");
    for t in v["targets"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "- {}: {} — {}\n",
            t["target"].as_str().unwrap_or(""),
            t["value"]
                .as_f64()
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            if t["met"] == true { "met" } else { "NOT met" }
        ));
    }
    s
}
