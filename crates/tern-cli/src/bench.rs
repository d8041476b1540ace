//! `tern bench ...` glue: arguments to options, the recorded command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_link::PROFILES;

#[derive(clap::Args, Debug)]
pub struct WanBenchArgs {
    /// Profiles to measure, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Pings per profile (10 ms apart).
    #[arg(long, default_value_t = 200)]
    pings: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for wan.json and wan.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn wan(a: WanBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    let profiles = if a.profiles.is_empty() {
        PROFILES.iter().map(|p| p.name.to_string()).collect()
    } else {
        a.profiles
    };
    let opts = tern_bench::wan::WanBenchOptions {
        profiles,
        duration_s: a.duration,
        pings: a.pings,
        seed: a.seed,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::wan::run(&opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AccelBenchArgs {
    /// Profiles whose goodput is measured, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// Transports: cubic, bbr (kernel TCP), kcptun, tern (lab up --accel).
    #[arg(long, value_delimiter = ',', default_value = "cubic,bbr,kcptun,tern")]
    transports: Vec<String>,
    /// Seconds per one-flow run on the incompressible payload, the runs the goodput targets
    /// are judged on: long, as a migration over these links is, so that loss-driven steady
    /// state and not the first seconds of slow start decides them.
    #[arg(long, default_value_t = 30)]
    seconds: u32,
    /// Seconds per 4-flow run and per compressible-corpus run.
    #[arg(long, default_value_t = 8)]
    short_seconds: u32,
    /// Skip the compressible-corpus runs.
    #[arg(long)]
    no_compressible: bool,
    /// Profiles for the 1 MiB request/response test ("none" for none).
    #[arg(long, value_delimiter = ',', default_value = "mpls")]
    rr_profiles: Vec<String>,
    /// Requests per request/response run.
    #[arg(long, default_value_t = 20)]
    rr_count: u32,
    /// The compressible corpus (made from /usr on first use, then reused).
    #[arg(long, default_value = "/var/tmp/tern-corpus-usr.tar")]
    corpus: PathBuf,
    /// Size cap of a newly made corpus, in MiB.
    #[arg(long, default_value_t = 512)]
    corpus_mib: u64,
    /// kcptun --sndwnd/--rcvwnd for every profile (default: max(4096, 2 × BDP)).
    #[arg(long)]
    kcptun_window: Option<u32>,
    /// kcptun FEC as DATA,PARITY shards (kcptun's own default is 10,3).
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [0, 0])]
    kcptun_fec: Vec<u32>,
    /// Directory for accel.json, accel.md and accel.svg.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn accel(a: AccelBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    let profiles = if a.profiles.is_empty() {
        PROFILES.iter().map(|p| p.name.to_string()).collect()
    } else {
        a.profiles
    };
    let rr_profiles = a
        .rr_profiles
        .into_iter()
        .filter(|p| !p.is_empty() && p != "none")
        .collect();
    let transports = a
        .transports
        .iter()
        .map(|t| tern_bench::accel::Transport::parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    if a.seconds == 0 || a.seconds > 600 {
        anyhow::bail!("--seconds must be 1..=600");
    }
    if a.short_seconds == 0 || a.short_seconds > 600 {
        anyhow::bail!("--short-seconds must be 1..=600");
    }
    if a.rr_count == 0 || a.rr_count > tern_bench::rr::MAX_COUNT {
        anyhow::bail!("--rr-count must be 1..={}", tern_bench::rr::MAX_COUNT);
    }
    let corpus_max_bytes = a.corpus_mib << 20;
    if corpus_max_bytes == 0 || corpus_max_bytes > tern_bench::accel::MAX_CORPUS_BYTES {
        anyhow::bail!(
            "--corpus-mib must be 1..={}",
            tern_bench::accel::MAX_CORPUS_BYTES >> 20
        );
    }
    let (ds, ps) = (a.kcptun_fec[0], a.kcptun_fec[1]);
    if ds + ps > tern_bench::accel::KCP_MAX_SHARDS || (ds == 0) != (ps == 0) {
        anyhow::bail!(
            "--kcptun-fec: both 0, or both > 0 with at most {} shards",
            tern_bench::accel::KCP_MAX_SHARDS
        );
    }
    if a.kcptun_window
        .is_some_and(|w| w == 0 || w > tern_bench::accel::KCP_MAX_WINDOW_PACKETS)
    {
        anyhow::bail!(
            "--kcptun-window must be 1..={}",
            tern_bench::accel::KCP_MAX_WINDOW_PACKETS
        );
    }
    let opts = tern_bench::accel::AccelBenchOptions {
        profiles,
        rr_profiles,
        transports,
        duration_s: a.seconds,
        short_duration_s: a.short_seconds,
        compressible: !a.no_compressible,
        rr_count: a.rr_count,
        corpus_path: a.corpus,
        corpus_max_bytes,
        kcptun_window_packets: a.kcptun_window,
        kcptun_fec: (ds, ps),
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::accel::run(&opts)?;
    Ok(())
}

/// `tern bench rr-server` (hidden): the server side of the 1 MiB request/response probe.
#[derive(clap::Args, Debug)]
pub struct RrServerArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Congestion control set on every accepted connection.
    #[arg(long)]
    cc: Option<String>,
    /// Exit after this many requests (default: serve until killed).
    #[arg(long)]
    max_requests: Option<u64>,
}

pub fn rr_server(a: RrServerArgs) -> Result<()> {
    tern_bench::rr::serve(a.listen, a.cc.as_deref(), a.max_requests)?;
    Ok(())
}

/// `tern bench rr-client` (hidden): sequential 1 MiB fetches, each on a new connection.
#[derive(clap::Args, Debug)]
pub struct RrClientArgs {
    #[arg(long)]
    connect: std::net::SocketAddr,
    #[arg(long, default_value_t = 20)]
    count: u32,
    /// Congestion control of the client's sockets.
    #[arg(long)]
    cc: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn rr_client(a: RrClientArgs) -> Result<()> {
    let r = tern_bench::rr::client(a.connect, a.count, a.cc.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} × 1 MiB from {}: median {:.2} ms, p90 {:.2} ms, min {:.2} ms, max {:.2} ms",
            r.count, a.connect, r.median_ms, r.p90_ms, r.min_ms, r.max_ms
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct VmotionBenchArgs {
    /// Link profiles, comma-separated (default: the seed's VMotion table).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,sonet,ll-metro,ll-metro-5ms,metro,mpls"
    )]
    profiles: Vec<String>,
    /// Methods: cubic, bbr (QEMU over kernel TCP), tern.
    #[arg(long, value_delimiter = ',', default_value = "cubic,bbr,tern")]
    methods: Vec<String>,
    /// Migrations per profile and method.
    #[arg(long, default_value_t = 4)]
    runs: u32,
    /// Guest RAM of the reference VM, MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Guest workload of the reference VM.
    #[arg(long, default_value = "web-db")]
    workload: String,
    /// Records the workload rewrites, MiB/s; QEMU sees about twice that in dirty pages (each
    /// write also dirties its checksum page). QEMU over cubic on `mpls` moves about 3 MiB/s,
    /// so with 2 it never converges.
    #[arg(long, default_value_t = 1)]
    rate: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the byte-for-byte RAM comparison (then only the guest's checksums verify).
    #[arg(long)]
    no_check_memory: bool,
    /// Give up on one migration after this many seconds.
    #[arg(long, default_value_t = 900)]
    migrate_timeout: u64,
    /// Directory for vmotion.json, vmotion.md and vmotion.svg.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn vmotion(a: VmotionBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    for p in &a.profiles {
        tern_link::Profile::find(p)?;
    }
    let methods = a
        .methods
        .iter()
        .map(|m| tern_bench::vmotion::Method::parse(m).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let opts = tern_bench::vmotion::VmotionOptions {
        profiles: a.profiles,
        methods,
        runs: a.runs.max(1),
        mem_mib: a.mem,
        workload: a.workload,
        rate_mb_s: a.rate,
        seed: a.seed,
        check_memory: !a.no_check_memory,
        migrate_timeout_s: a.migrate_timeout,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::vmotion::run(&opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct CloudnetBenchArgs {
    /// Link profile.
    #[arg(long, default_value = "cloudnet-lab")]
    profile: String,
    /// Workloads, comma-separated (CloudNet's TPC-W, kernel compile, SPECjbb).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "web-db,kernel-compile,java-heap"
    )]
    workloads: Vec<String>,
    /// Configurations in the order they run, comma-separated: qemu-default, qemu-xbzrle,
    /// qemu-multifd-zstd, qemu-best, tern-none, tern-re, tern-delta, tern-zstd,
    /// tern-smart-stop, tern-all, tern-all-return (default: all of them).
    #[arg(long, value_delimiter = ',')]
    configs: Vec<String>,
    /// Runs per workload (each on a fresh lab with cold content stores).
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Records each workload rewrites, MiB/s (QEMU sees about twice that in dirty pages; at
    /// 2, QEMU's default converges on cloudnet-lab).
    #[arg(long, default_value_t = 2)]
    rate: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up on one migration after this many seconds.
    #[arg(long, default_value_t = 900)]
    migrate_timeout: u64,
    /// Directory for cloudnet.json, cloudnet.md, cloudnet.svg and cloudnet-time.svg.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn cloudnet(a: CloudnetBenchArgs) -> Result<()> {
    use tern_bench::cloudnet::{CloudnetOptions, Config};
    tern_lab::check_prerequisites()?;
    tern_link::Profile::find(&a.profile)?;
    for w in &a.workloads {
        if !["web-db", "kernel-compile", "java-heap", "idle"].contains(&w.as_str()) {
            anyhow::bail!("unknown workload {w:?} (web-db, kernel-compile, java-heap, idle)");
        }
    }
    let configs = if a.configs.is_empty() {
        Config::ALL.to_vec()
    } else {
        a.configs
            .iter()
            .map(|c| Config::parse(c).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?
    };
    let opts = CloudnetOptions {
        profile: a.profile,
        workloads: a.workloads,
        configs,
        runs: a.runs.max(1),
        mem_mib: a.mem,
        rate_mb_s: a.rate,
        seed: a.seed,
        migrate_timeout_s: a.migrate_timeout,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::cloudnet::run(&opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DiskBenchArgs {
    /// Volume size, MiB (ext4 filled from --sources, the first copied twice).
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Directories whose files fill the volume, comma-separated (missing ones skipped).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/usr/share/doc,/usr/bin,/usr/share/man"
    )]
    sources: Vec<PathBuf>,
    /// Link profile for the initial sync and the re-sync (tern and QEMU's mirror alike).
    #[arg(long, default_value = "cloudnet-lab")]
    sync_profile: String,
    /// Link profiles for the write-latency measurements, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cloudnet-wan,dr-50")]
    latency_profiles: Vec<String>,
    /// Synchronous writes per latency measurement (async and local: five times as many).
    #[arg(long, default_value_t = 200)]
    latency_writes: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for disk.json and disk.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn disk(a: DiskBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    tern_link::Profile::find(&a.sync_profile)?;
    for p in &a.latency_profiles {
        tern_link::Profile::find(p)?;
    }
    let mut opts = tern_bench::disk::DiskBenchOptions::new(
        std::env::current_exe().context("locate the tern binary")?,
        a.out,
    );
    opts.size_mib = a.size_mib;
    opts.sources = a.sources;
    opts.sync_profile = a.sync_profile;
    opts.latency_profiles = a.latency_profiles;
    opts.latency_writes = a.latency_writes.max(1);
    opts.seed = a.seed;
    opts.command = format!(
        "tern {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    tern_bench::disk::run(&opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DrBenchArgs {
    /// Link profiles, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "dr-50,dr-100")]
    profiles: Vec<String>,
    /// Closed-loop clients (connections to the key-value service, at most 64: the guest's
    /// limit). Enough that the service, not the clients' own round trips, limits pipelined
    /// throughput: by Little's law a client count N keeps a service of X replies/s busy
    /// only while N >= X x response time, and pipelined replies wait one RTT more
    /// (250/s x (0.13 + 0.055) s = 46 on dr-50).
    #[arg(long, default_value_t = 64)]
    clients: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 15)]
    seconds: u32,
    /// Tiers to measure, comma-separated: 1 (the key-value VM alone) and/or 2 (a front
    /// end in front of it).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    tiers: Vec<u32>,
    /// Two tiers: database commits the front end makes per request.
    #[arg(long, default_value_t = 4)]
    calls: u32,
    /// Two tiers: closed-loop clients (response time, not saturation, is the measure).
    #[arg(long, default_value_t = 4)]
    tier2_clients: u32,
    /// Measurements per row, modes interleaved, each in a fresh lab (medians reported).
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Directory for dr.json and dr.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn dr(a: DrBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    if a.tiers.is_empty() || a.tiers.iter().any(|t| !(1..=2).contains(t)) {
        anyhow::bail!("--tiers takes 1 and/or 2");
    }
    for p in &a.profiles {
        tern_link::Profile::find(p)?;
    }
    if !(1..=64).contains(&a.clients) || !(1..=64).contains(&a.tier2_clients) {
        anyhow::bail!(
            "--clients and --tier2-clients take 1 to 64 (the guest's service closes \
             connections beyond 64)"
        );
    }
    if !(1..=64).contains(&a.calls) || !(1..=20).contains(&a.runs) {
        anyhow::bail!("--calls takes 1 to 64, --runs 1 to 20");
    }
    let opts = tern_bench::dr::DrBenchOptions {
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        out_dir: a.out,
        profiles: a.profiles,
        clients: a.clients,
        seconds: a.seconds.max(1),
        tiers: a.tiers.clone(),
        calls: a.calls,
        tier2_clients: a.tier2_clients,
        runs: a.runs,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::dr::run(&opts)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MgmtBenchArgs {
    /// Link profile of the lab.
    #[arg(long, default_value = "sonet")]
    profile: String,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Pairs of runs (alone, with idle clients), alternating which goes first.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Idle connections to each of the metrics port and the control socket.
    #[arg(long, default_value_t = 200)]
    idle: u32,
    /// Seconds into the flow at which the idle clients connect.
    #[arg(long, default_value_t = 2.5)]
    open_after: f64,
    /// Directory for mgmt.json and mgmt.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RekeyBenchArgs {
    /// Link profile of the lab.
    #[arg(long, default_value = "sonet")]
    profile: String,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Pairs of runs (default keys, frequent key updates), alternating which goes first.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Key update after this many packets in the frequent-update runs (1024..=4194304).
    #[arg(long, default_value_t = 65536)]
    rekey_after_packets: u64,
    /// Directory for rekey.json and rekey.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn rekey(a: RekeyBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    tern_link::Profile::find(&a.profile)?;
    if !(3..=120).contains(&a.seconds) || !(1..=10).contains(&a.rounds) {
        anyhow::bail!("--seconds takes 3 to 120, --rounds 1 to 10");
    }
    if !(1024..=1 << 22).contains(&a.rekey_after_packets) {
        anyhow::bail!("--rekey-after-packets takes 1024 to 4194304");
    }
    if tern_lab::status().is_ok_and(|s| s.up) {
        anyhow::bail!("a lab is up: the bench brings its own up and down (`tern lab down` first)");
    }
    let opts = tern_bench::rekey::RekeyBenchOptions {
        profile: a.profile,
        seconds: a.seconds,
        rounds: a.rounds,
        rekey_after_packets: a.rekey_after_packets,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::rekey::run(&opts)?;
    Ok(())
}

pub fn mgmt(a: MgmtBenchArgs) -> Result<()> {
    tern_lab::check_prerequisites()?;
    tern_link::Profile::find(&a.profile)?;
    if !(3..=120).contains(&a.seconds) || !(1..=10).contains(&a.rounds) {
        anyhow::bail!("--seconds takes 3 to 120, --rounds 1 to 10");
    }
    if !(1..=1000).contains(&a.idle) || !(0.0..a.seconds as f64).contains(&a.open_after) {
        anyhow::bail!("--idle takes 1 to 1000; --open-after must fall inside the run");
    }
    let opts = tern_bench::mgmt::MgmtBenchOptions {
        profile: a.profile,
        seconds: a.seconds,
        rounds: a.rounds,
        idle: a.idle,
        open_after_s: a.open_after,
        out_dir: a.out,
        tern_exe: std::env::current_exe().context("locate the tern binary")?,
        command: format!(
            "tern {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    tern_bench::mgmt::run(&opts)?;
    Ok(())
}
