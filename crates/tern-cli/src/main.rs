//! `tern` — one binary for the WAN lab, the link emulator and the benchmarks.
//!
//! Exit codes: 0 success, 1 failure (the error chain is printed), 2 bad usage.

mod agent;
mod analyze;
mod balance;
mod bench;
mod disk;
mod migrate;
mod model;
mod place;
mod protect;
mod vm;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tern_lab::LinkChanges;
use tern_link::{JitterShape, LinkSpec, format_rate, parse_duration_us, parse_loss, parse_rate};
use tern_wan::proto::Direction;

#[derive(Parser, Debug)]
#[command(
    name = "tern",
    version,
    about = "Move live VMs between data centers over the WAN, fast — and the lab to measure it in."
)]
struct Cli {
    /// The cluster file: the sites, their nodes' sockets and addresses (default:
    /// $TERN_CLUSTER, else /etc/tern/cluster.toml, else the running lab's
    /// /run/tern/lab/cluster.toml). Read by vm, migrate, protect, failover and the node's
    /// site agent.
    #[arg(long, global = true, value_name = "PATH")]
    cluster: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The two-site WAN lab: network namespaces tern-a and tern-b joined by the emulator.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Run the userspace WAN link emulator between two existing TUN devices (foreground).
    Wan(WanArgs),
    /// Benchmarks; each writes JSON and markdown under bench/results/.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The per-site WAN accelerator daemon (TCP termination over tern's UDP transport).
    #[command(subcommand)]
    Node(NodeCmd),
    /// The site agent: ask this site's node, or a peer site's through it, to list, start,
    /// stop or promote VMs and volumes there (`docs/agent.md`).
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Guest VMs at a site: start, list, stop (QEMU under TCG).
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// The cluster file: check it and show its sites (`docs/deploy.md`).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Volumes: create, import, export, inspect, verify; serve over NBD and replicate.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Live-migrate a VM to the other site over tern's transport (or --direct kernel TCP),
    /// with progress and a summary (`--json`: total_s, downtime_ms, wire_bytes, verified).
    Migrate(migrate::MigrateArgs),
    /// Disaster recovery: replicate a running VM's volume to a backup site (pipelined,
    /// sync or async); `tern protect status`, `tern protect stop NAME`.
    Protect(protect::ProtectArgs),
    /// Declare a protected VM's primary site lost: promote the backup volume and boot the
    /// VM at the backup site; prints RPO and RTO.
    Failover(protect::FailoverArgs),
    /// MOVE's virtualization-overhead model: `fit` a training set, `predict` CPU traces.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Sandpiper's hotspot controller on a pool snapshot: `plan --dry-run`, `explain`.
    #[command(subcommand)]
    Balance(balance::BalanceCmd),
    /// Per-TCP-flow analysis of pcaps: ACK inter-arrivals and ACK-compression, burstiness,
    /// throughput, retransmissions (`--json`, `--svg DIR`).
    Analyze(analyze::AnalyzeArgs),
    /// Memory Buddies: fingerprint a raw memory image / memory file / process RAM.
    Fingerprint(place::FingerprintArgs),
    /// Memory Buddies: sharing-aware placement (`plan --input FILE.json`).
    #[command(subcommand)]
    Place(place::PlaceCmd),
    /// Write a new node identity: private key to a file (mode 0600), public key to stdout.
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script, e.g. `tern completions bash >
    /// /usr/share/bash-completion/completions/tern`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (tern.1 and one per subcommand, e.g. tern-node-run.1) into DIR.
    Man {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// Where `tern node` finds its config: `--config`, else `$TERN_NODE_CONFIG`, else
/// `/etc/tern/node.toml`.
const NODE_CONFIG_HELP: &str = "Node config [default: $TERN_NODE_CONFIG, else /etc/tern/node.toml]";

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// Send one request to a site agent and print its reply (exit 1 on an error reply),
    /// e.g. `tern agent call --config /run/tern/lab/node-b.toml --site site-a vm.list`.
    Call(agent::CallArgs),
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Run a node in the foreground until SIGINT/SIGTERM; SIGHUP re-reads the config's peers.
    /// Tells systemd when it is ready (`Type=notify`; see docs/deploy.md). Its site agent
    /// manages this site's VMs (`docs/agent.md`).
    Run {
        #[arg(long, help = NODE_CONFIG_HELP)]
        config: Option<PathBuf>,
        /// The site whose VMs the node's agent manages (default: the node's name without
        /// a leading `site-`).
        #[arg(long)]
        agent_site: Option<String>,
    },
    /// Peers, transport counters and flows of a running node.
    Status {
        /// The node's control socket (`control` in its config).
        #[arg(long, conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Read the control socket path from this config [default: as `node run`].
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make a running node re-read its config (as SIGHUP does): peers added or removed, their
    /// keys, addresses and grants apply at once; other changes are refused (restart instead).
    Reload {
        /// The node's control socket (`control` in its config).
        #[arg(long, conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Read the control socket path from this config [default: as `node run`].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a config (parse, keys and their file modes, addresses bindable) and print what it
    /// would do; exit status 1 if the node could not start with it.
    Check {
        #[arg(long, help = NODE_CONFIG_HELP)]
        config: Option<PathBuf>,
        /// The findings as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--config`, else `$TERN_NODE_CONFIG`, else `/etc/tern/node.toml`.
fn node_config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| {
            std::env::var_os(tern_node::config::PATH_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(tern_node::config::DEFAULT_PATH))
}

/// Loads the node config, with a clear error when the file is not there.
fn load_node_config(given: Option<PathBuf>) -> Result<tern_node::NodeConfig> {
    let path = node_config_path(given);
    if !path.exists() {
        bail!(
            "no node config at {} (give --config FILE or set {}; docs/deploy.md has an example)",
            path.display(),
            tern_node::config::PATH_ENV
        );
    }
    Ok(tern_node::NodeConfig::load(&path)?)
}

#[derive(Subcommand, Debug)]
enum LabCmd {
    /// Create the sites and start the link (fails if a lab is already up).
    Up {
        #[command(flatten)]
        link: LinkArgs,
        /// Seed of the emulator's loss and jitter draws (logged in `lab stats`).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Capture both sides of the link as pcap files in this directory.
        #[arg(long)]
        pcap_dir: Option<PathBuf>,
        /// Write every packet separately (no GSO coalescing of TCP trains on egress).
        #[arg(long)]
        no_gso: bool,
        /// Make each site's tern node transparently accelerate TCP between 198.18.1.0/24 and
        /// 198.18.2.0/24; without it, that traffic is plain kernel TCP. (The nodes always run:
        /// they carry the VM overlay 198.18.100.0/24 and `tern migrate` streams.)
        #[arg(long)]
        accel: bool,
        /// Add a client site `c` (netns tern-c, 198.18.3.1/24) with emulated links of the
        /// same profile to a (`c-a`) and b (`c-b`); it reaches the VM overlay through a
        /// until a `tern failover` moves it.
        #[arg(long)]
        client_site: bool,
        /// Make the nodes update their keys after this many packets (1024..=4194304, the
        /// default) instead of the transport's own limit: to measure rekeying's cost.
        #[arg(long, value_name = "PACKETS")]
        rekey_after_packets: Option<u64>,
    },
    /// Remove everything the lab made (idempotent; also cleans up after a crash).
    Down,
    /// Sites, namespaces, addresses and the current link.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Counters of both link directions: forwarded, queue drops, random drops, sojourn time.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Change the running link without dropping queued packets.
    Set {
        #[command(flatten)]
        link: LinkArgs,
        /// Which direction to change (default: both; on c-a and c-b, a-to-b is client to
        /// site).
        #[arg(long, value_enum)]
        direction: Option<DirArg>,
        /// Which link: a-b, or the client site's c-a / c-b.
        #[arg(long = "link", default_value = "a-b", value_parser = ["a-b", "c-a", "c-b"])]
        between: String,
    },
    /// Run a command inside a site's namespace, e.g. `tern lab exec a -- ping 198.18.2.1`.
    Exec {
        /// Site name: a, b, or c (with `lab up --client-site`).
        site: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Route the client site (`lab up --client-site`) to the VM overlay through SITE (the
    /// lab's cluster file runs it after `tern failover`, as its `on_failover`).
    RouteClients {
        /// a or b.
        site: String,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Read and check the cluster file; print its sites (which file was read first).
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Measure the emulator against its own settings on every profile.
    Wan(bench::WanBenchArgs),
    /// tern's accelerator against kernel TCP (cubic, bbr) and kcptun on every profile.
    Accel(bench::AccelBenchArgs),
    /// The seed's VMotion table: live migration of a reference VM on every seed profile,
    /// QEMU over TCP cubic and bbr against tern, verified every time.
    Vmotion(bench::VmotionBenchArgs),
    /// CloudNet's Tables 6.1/6.2: three workloads x QEMU's own options and tern's
    /// optimizations (each alone, all, and migrating back), verified every time.
    Cloudnet(bench::CloudnetBenchArgs),
    /// A guest disk across the WAN: tern's initial sync and re-sync vs QEMU's blockdev-mirror
    /// into qemu-nbd over TCP (bytes, time, identical copies), and guest write latency with
    /// no, async and sync replication.
    Disk(bench::DiskBenchArgs),
    /// Disaster recovery: the guest's key-value service under async, sync and pipelined
    /// (async + PipeCloud's gate) replication; throughput and response times.
    Dr(bench::DrBenchArgs),
    /// Idle clients of node A's metrics port and control socket during an accelerated
    /// iperf3 flow: goodput with them against without, side by side.
    Mgmt(bench::MgmtBenchArgs),
    /// Session key updates during an accelerated iperf3 flow: goodput with frequent
    /// updates against the transport's own limit, side by side.
    Rekey(bench::RekeyBenchArgs),
    /// Sandpiper's simulated experiments (`--sim`): 16 hosts / 35 VMs vs static, the
    /// 50-host stress test, planner time for 500 / 5,000 / 50,000 VMs.
    Sandpiper(balance::SandpiperBenchArgs),
    /// Memory Buddies' simulated experiments (`--sim`): Bloom accuracy and size, estimation
    /// time and bytes, hashing cost, the 100-host placement simulation.
    Membuddies(place::MembuddiesBenchArgs),
    /// Server of the 1 MiB request/response probe (used by `bench accel`).
    #[command(hide = true)]
    RrServer(bench::RrServerArgs),
    /// Client of the 1 MiB request/response probe (used by `bench accel`).
    #[command(hide = true)]
    RrClient(bench::RrClientArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DirArg {
    /// Traffic sent by site A.
    AToB,
    /// Traffic sent by site B.
    BToA,
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ShapeArg {
    Uniform,
    Normal,
}

/// Link settings. A profile sets everything; the other flags override parts of it.
#[derive(Args, Debug, Default, Clone)]
struct LinkArgs {
    /// Named link profile (baseline, sonet, ll-metro, ll-metro-5ms, metro, mpls, cloudnet-lab,
    /// cloudnet-wan, dr-50, dr-100, thesis).
    #[arg(long)]
    profile: Option<String>,
    /// Serialization rate, e.g. 100mbit, 1gbit (bits/s in every spelling; 0 = unlimited).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Round-trip time; each direction gets half, e.g. 25ms.
    #[arg(long, value_parser = parse_duration_us)]
    rtt: Option<u64>,
    /// Random loss per direction: 0.05% (Bernoulli) or ge:P%,R%[,H%[,K%]] (Gilbert–Elliott).
    #[arg(long, value_parser = parse_loss)]
    loss: Option<tern_link::LossModel>,
    /// Jitter amplitude per direction, e.g. 3ms (uniform ±3 ms by default).
    #[arg(long, value_parser = parse_duration_us)]
    jitter: Option<u64>,
    /// Jitter distribution: uniform on ±jitter, or normal with σ = jitter (cut at 3σ).
    #[arg(long, value_enum)]
    jitter_shape: Option<ShapeArg>,
    /// Let jitter reorder packets (by default order is kept, as on most real WANs).
    #[arg(long)]
    reorder: bool,
    /// Drop-tail queue limit in packets (default: one bandwidth-delay product in bytes).
    #[arg(long)]
    queue: Option<u32>,
    /// Drop-tail queue limit in bytes.
    #[arg(long)]
    queue_bytes: Option<u64>,
}

impl LinkArgs {
    fn changes(&self) -> LinkChanges {
        LinkChanges {
            profile: self.profile.clone(),
            rate_bps: self.rate,
            rtt_us: self.rtt,
            loss: self.loss,
            jitter_us: self.jitter,
            jitter_shape: self.jitter_shape.map(|s| match s {
                ShapeArg::Uniform => JitterShape::Uniform,
                ShapeArg::Normal => JitterShape::Normal,
            }),
            reorder: self.reorder.then_some(true),
            queue_packets: self.queue,
            queue_bytes: self.queue_bytes,
        }
    }
}

#[derive(Args, Debug)]
struct WanArgs {
    /// TUN device of side A (must exist, e.g. `ip tuntap add dev tunA mode tun`).
    #[arg(long)]
    a_dev: String,
    /// Network namespace (`ip netns` name) holding side A's device.
    #[arg(long)]
    a_netns: Option<String>,
    #[arg(long)]
    b_dev: String,
    #[arg(long)]
    b_netns: Option<String>,
    /// Control socket for stats and live changes (JSON lines).
    #[arg(long, default_value = "/run/tern/wan.sock")]
    control: PathBuf,
    #[command(flatten)]
    link: LinkArgs,
    /// The whole link as JSON (used by `tern lab up`); overrides the link flags.
    #[arg(long, hide = true)]
    spec_json: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest packet expected on the devices (their MTU).
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    /// Write a pcap per direction and side (a-to-b.ingress.pcap, ...) into this directory.
    #[arg(long)]
    pcap_dir: Option<PathBuf>,
    /// Bytes captured per packet.
    #[arg(long, default_value_t = 128)]
    pcap_snaplen: u32,
    /// Capture stops (and counts skipped packets) once a file reaches this size in MiB.
    #[arg(long, default_value_t = 1024)]
    pcap_max_mib: u64,
    /// Write every packet separately instead of coalescing TCP trains into GSO packets.
    #[arg(long)]
    no_gso: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Some(p) = &cli.cluster {
        // SAFETY: set before any thread is started; every reader of the cluster file (this
        // process and the children it runs) finds it through the environment.
        unsafe { std::env::set_var(tern_cluster::ENV, p) };
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn cluster_show(json: bool) -> Result<()> {
    let c = tern_cluster::Cluster::load(None)?;
    if json {
        let sites: Vec<_> = c
            .sites
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "address": s.address.to_string(), "node": s.node,
                    "control": s.control, "migrate": s.migrate, "switch": s.switch,
                    "overlay_gateway": s.overlay_gateway.map(|g| g.to_string()),
                    "netns": s.netns,
                    "node_answers": tern_node::request_status(&s.control).is_ok(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "path": c.path, "vm_dir": c.vm_dir,
            "direct_ports": [c.direct_ports.0, c.direct_ports.1],
            "profile": c.profile, "on_failover": c.on_failover, "sites": sites,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} (VM state under {})",
        c.path.display(),
        c.vm_dir.display()
    );
    for s in &c.sites {
        let answers = if tern_node::request_status(&s.control).is_ok() {
            "node answers"
        } else {
            "node does not answer"
        };
        println!(
            "  site {}: {} node {} ({}){}",
            s.name,
            s.address,
            s.node,
            answers,
            s.netns
                .as_ref()
                .map(|n| format!(", netns {n}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Wan(a) => wan(a),
        Cmd::Lab(c) => lab(c),
        Cmd::Cluster(ClusterCmd::Show { json }) => cluster_show(json),
        Cmd::Bench(BenchCmd::Wan(a)) => bench::wan(a),
        Cmd::Bench(BenchCmd::Accel(a)) => bench::accel(a),
        Cmd::Bench(BenchCmd::Vmotion(a)) => bench::vmotion(a),
        Cmd::Bench(BenchCmd::Cloudnet(a)) => bench::cloudnet(a),
        Cmd::Bench(BenchCmd::Disk(a)) => bench::disk(a),
        Cmd::Bench(BenchCmd::Dr(a)) => bench::dr(a),
        Cmd::Bench(BenchCmd::Mgmt(a)) => bench::mgmt(a),
        Cmd::Bench(BenchCmd::Rekey(a)) => bench::rekey(a),
        Cmd::Bench(BenchCmd::Sandpiper(a)) => balance::bench(a),
        Cmd::Bench(BenchCmd::Membuddies(a)) => place::bench(a),
        Cmd::Bench(BenchCmd::RrServer(a)) => bench::rr_server(a),
        Cmd::Bench(BenchCmd::RrClient(a)) => bench::rr_client(a),
        Cmd::Node(c) => node(c),
        Cmd::Agent(AgentCmd::Call(a)) => agent::run_call(a),
        Cmd::Vm(c) => vm::run(c),
        Cmd::Migrate(a) => migrate::run(a),
        Cmd::Protect(a) => protect::run(a),
        Cmd::Failover(a) => protect::failover(a),
        Cmd::Disk(c) => disk::run(c),
        Cmd::Balance(c) => balance::run(c),
        Cmd::Model(c) => model::run(c),
        Cmd::Analyze(a) => analyze::run(a),
        Cmd::Fingerprint(a) => place::fingerprint(a),
        Cmd::Place(c) => place::run(c),
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Completions { shell } => {
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "tern",
                &mut script,
            );
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Cmd::Man { dir } => man(&dir),
    }
}

/// Writes tern.1 and a page per (visible) subcommand into `dir`.
fn man(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)
        .with_context(|| format!("write man pages into {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("tern") && n.ends_with(".1"))
        .count();
    eprintln!("wrote {pages} man pages into {}", dir.display());
    Ok(())
}

fn wan(a: WanArgs) -> Result<()> {
    let spec: LinkSpec = match &a.spec_json {
        Some(j) => serde_json::from_str(j).context("bad --spec-json")?,
        None => a.link.changes().to_spec()?,
    };
    let dir = spec.direction();
    let side = |netns: &Option<String>, dev: &str| tern_wan::TunSide {
        netns: netns.clone(),
        dev: dev.to_string(),
        mtu: a.mtu,
    };
    let opts = tern_wan::EmulatorOptions {
        a: side(&a.a_netns, &a.a_dev),
        b: side(&a.b_netns, &a.b_dev),
        a_to_b: dir.clone(),
        b_to_a: dir,
        seed: a.seed,
        pcap: a.pcap_dir.clone().map(|d| tern_wan::PcapOptions {
            dir: d,
            snaplen: a.pcap_snaplen,
            max_bytes_per_file: a.pcap_max_mib << 20,
        }),
        gso: !a.no_gso,
    };
    if let Some(parent) = a.control.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let emu = tern_wan::Emulator::start(opts)?;
    eprintln!(
        "tern wan: forwarding {} <-> {} at {}, rtt {} ms, loss {:.4}%, jitter {} ms, seed {}; control {}",
        a.a_dev,
        a.b_dev,
        format_rate(spec.rate_bps),
        spec.rtt_us as f64 / 1e3,
        spec.loss.mean_loss() * 100.0,
        spec.jitter_us as f64 / 1e3,
        a.seed,
        a.control.display()
    );
    tern_wan::serve(emu, &a.control)?;
    Ok(())
}

fn keygen(out: &std::path::Path) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let k = tern_transport::crypto::StaticKeypair::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {} (it must not exist yet)", out.display()))?;
    writeln!(f, "{}", tern_transport::crypto::encode_key(&k.private))?;
    println!("{}", tern_transport::crypto::encode_key(&k.public));
    eprintln!(
        "private key written to {}; the line above is the public key for peers' configs",
        out.display()
    );
    Ok(())
}

/// What a config makes the node do (`tern node check`).
fn describe_node(cfg: &tern_node::NodeConfig) {
    println!(
        "node {}: UDP {}, public key {}",
        cfg.name,
        cfg.listen,
        tern_transport::crypto::encode_key(&cfg.identity.public)
    );
    for p in &cfg.peers {
        println!(
            "  peer {} at {}",
            p.name,
            p.address.map_or("(accepts only)".into(), |a| a.to_string())
        );
        let purposes: Vec<&str> = p
            .grants
            .purposes()
            .iter()
            .filter(|&&x| x != tern_node::grants::Purpose::Tcp)
            .map(|x| x.name())
            .collect();
        println!("    may open: {}", purposes.join(", "));
        let agent: Vec<&str> = p
            .grants
            .agent()
            .commands()
            .iter()
            .map(|c| c.name())
            .collect();
        println!(
            "    may call agent commands: {}",
            if agent.is_empty() {
                "none".to_string()
            } else {
                agent.join(", ")
            }
        );
        let targets: Vec<String> = p.grants.tcp_targets.iter().map(|t| t.to_string()).collect();
        println!(
            "    may have TCP connected to: {}",
            if targets.is_empty() {
                "nothing".to_string()
            } else {
                targets.join(", ")
            }
        );
    }
    for a in &cfg.accelerate {
        println!(
            "  transparently accelerate TCP to {} via {}",
            a.subnet, cfg.peers[a.peer].name
        );
    }
    for f in &cfg.forward {
        println!(
            "  forward {} -> {} via {}",
            f.listen, f.target, cfg.peers[f.peer].name
        );
    }
    if let Some((a, b)) = cfg.bypass_ports {
        println!("  never intercept TCP to ports {a}-{b}");
    }
    if let Some(o) = &cfg.overlay {
        println!(
            "  overlay switch at {}{}",
            o.socket.display(),
            o.tap
                .as_ref()
                .map_or(String::new(), |t| format!(", TAP {t}"))
        );
    }
    if let Some(m) = &cfg.migration {
        println!(
            "  migration relay at {} (targets under {})",
            m.socket.display(),
            m.target_dir.display()
        );
    }
}

fn node(c: NodeCmd) -> Result<()> {
    match c {
        NodeCmd::Run { config, agent_site } => {
            let cfg = load_node_config(config)?;
            for w in &cfg.warnings {
                eprintln!("tern node: warning: {w}");
            }
            let site = agent::site_of(&cfg.name, agent_site.as_deref());
            let switch = cfg.overlay.as_ref().map(|o| o.socket.clone());
            let handler = agent::SiteAgent::new(tern_vm::vm::VmHost::lab(), &site, switch);
            tern_node::Node::with_agent(cfg, Some(std::sync::Arc::new(handler)))?.run()?;
        }
        NodeCmd::Reload { socket, config } => {
            let socket = match socket {
                Some(s) => s,
                None => {
                    load_node_config(config)
                        .context(
                            "the config does not load, so it names no control socket \
                             (a running node keeps its old config; `tern node check` shows why)",
                        )?
                        .control
                }
            };
            let done = tern_node::request_reload(&socket)?;
            println!("reloaded: {done}");
        }
        NodeCmd::Check { config, json } => {
            let path = node_config_path(config);
            let (report, cfg) = tern_node::check::check(&path);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    let level = match f.level {
                        tern_node::check::Level::Ok => "ok",
                        tern_node::check::Level::Warning => "warning",
                        tern_node::check::Level::Error => "error",
                    };
                    println!("{level:<8} {}: {}", f.check, f.message);
                }
                if let Some(cfg) = &cfg {
                    describe_node(cfg);
                }
            }
            if !report.ok {
                bail!("{}: the node would not start with it", path.display());
            }
        }
        NodeCmd::Status {
            socket,
            config,
            json,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => load_node_config(config)?.control,
            };
            let s = tern_node::request_status(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("node {} (udp {}), up {:.0} s", s.name, s.listen, s.uptime_s);
                for p in &s.peers {
                    print!(
                        "  peer {}: {}",
                        p.name,
                        if p.connected {
                            "connected"
                        } else {
                            "not connected"
                        }
                    );
                    if let Some(t) = &p.transport {
                        print!(
                            ", srtt {:.1} ms, rate {}, loss est {:.3}%, sent {} B, fec recovered {}",
                            t.srtt_us as f64 / 1e3,
                            format_rate(t.pacing_rate_bps),
                            t.loss_estimate * 100.0,
                            t.bytes_sent,
                            t.fec_recovered
                        );
                    }
                    println!();
                }
                let f = &s.flows;
                println!(
                    "  flows: {} active, {} opened, {} refused; TCP in {} B, out {} B; compressed {} -> {} B",
                    f.active,
                    f.opened,
                    f.refused,
                    f.tcp_bytes_in,
                    f.tcp_bytes_out,
                    f.compress_in,
                    f.compress_out
                );
                let u = &s.udp;
                println!(
                    "  udp: gso {} ({} messages, {} datagrams), gro {} trains ({} datagrams)",
                    if u.gso { "on" } else { "off" },
                    u.gso_messages,
                    u.gso_datagrams,
                    u.gro_trains,
                    u.gro_datagrams
                );
                let g = &s.agent;
                println!(
                    "  agent: {} requests ({} from peers), {} served, {} refused, {} bad, {} overloaded, {} relayed",
                    g.requests,
                    g.from_peers,
                    g.served,
                    g.refused,
                    g.bad_requests,
                    g.overloaded,
                    g.relayed
                );
                if let Some(last) = &s.reload.last {
                    println!(
                        "  reloads: {} applied, {} refused; last: {last}",
                        s.reload.applied, s.reload.refused
                    );
                }
                let e = &s.endpoint;
                println!(
                    "  drops: malformed {}, unknown session {}, handshakes rejected {} (unknown key {})",
                    e.dropped_malformed,
                    e.dropped_unknown_session,
                    e.handshakes_rejected,
                    e.handshakes_unknown_key
                );
            }
        }
    }
    Ok(())
}

fn describe(c: &tern_link::DirectionConfig) -> String {
    format!(
        "rate {}, delay {} ms, jitter {} ms ({:?}{}), loss {:.4}%, queue {} B / {} pkts",
        format_rate(c.rate_bps),
        c.delay_us as f64 / 1e3,
        c.jitter_us as f64 / 1e3,
        c.jitter_shape,
        if c.reorder { ", reordering" } else { "" },
        c.loss.mean_loss() * 100.0,
        c.queue_limit_bytes,
        c.queue_limit_packets
    )
}

fn lab(c: LabCmd) -> Result<()> {
    match c {
        LabCmd::Up {
            link,
            seed,
            pcap_dir,
            no_gso,
            accel,
            client_site,
            rekey_after_packets,
        } => {
            let changes = link.changes();
            if changes.profile.is_none() && changes.is_empty() {
                bail!(
                    "give a --profile or custom link flags (--rate, --rtt, --loss, --jitter, --queue); see `tern lab up --help`"
                );
            }
            let st = tern_lab::up(&tern_lab::UpOptions {
                changes,
                seed,
                pcap_dir,
                gso: !no_gso,
                accel,
                client_site,
                rekey_after_packets,
                tern_exe: std::env::current_exe().context("locate the tern binary")?,
            })?;
            println!("lab up: profile {}", st.profile);
            for s in &st.sites {
                println!(
                    "  site {}: netns {}, address {} ({}), WAN device {}",
                    s.name, s.netns, s.address, s.subnet, s.wan_dev
                );
            }
            println!(
                "  link (each direction): {}",
                describe(&st.spec.direction())
            );
            println!(
                "  emulator pid {}, log {}",
                st.emulator_pid,
                st.emulator_log.display()
            );
            for n in &st.nodes {
                println!(
                    "  tern node in site {}: pid {}, config {}, log {}",
                    n.site,
                    n.pid,
                    n.config.display(),
                    n.log.display()
                );
            }
            println!("try: tern lab exec a -- ping -c 3 198.18.2.1");
        }
        LabCmd::Down => {
            tern_lab::down()?;
            println!("lab down");
        }
        LabCmd::Status { json } => {
            let s = tern_lab::status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else if !s.up {
                println!("lab is down");
            } else {
                println!("lab up: profile {}", s.profile.unwrap_or_default());
                for site in &s.sites {
                    println!(
                        "  site {}: netns {}, address {} ({})",
                        site.name, site.netns, site.address, site.subnet
                    );
                }
                if let (Some(ab), Some(ba)) = (&s.a_to_b, &s.b_to_a) {
                    println!("  a-to-b: {}", describe(ab));
                    println!("  b-to-a: {}", describe(ba));
                }
            }
        }
        LabCmd::Stats { json } => {
            let s = tern_lab::stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("seed {}, up {:.1} s", s.seed, s.uptime_ms as f64 / 1e3);
                for r in [&s.a_to_b, &s.b_to_a] {
                    let c = &r.stats.counters;
                    println!(
                        "  {:?}: forwarded {} pkts / {} B, queue drops {}, random drops {}, sojourn p50 {} µs p99 {} µs, late p99 {} µs",
                        r.direction,
                        c.forwarded_packets,
                        c.forwarded_bytes,
                        c.queue_drop_packets,
                        c.random_drop_packets,
                        r.stats.sojourn.p50_us,
                        r.stats.sojourn.p99_us,
                        r.stats.lateness.p99_us
                    );
                }
            }
        }
        LabCmd::Set {
            link,
            direction,
            between,
        } => {
            let changes = link.changes();
            if changes.is_empty() {
                bail!(
                    "nothing to change: give --profile or link flags (see `tern lab set --help`)"
                );
            }
            let dirs = match direction {
                None | Some(DirArg::Both) => vec![],
                Some(DirArg::AToB) => vec![Direction::AToB],
                Some(DirArg::BToA) => vec![Direction::BToA],
            };
            tern_lab::set_link(&between, &changes, &dirs)?;
            let s = tern_lab::status()?;
            if between != "a-b" {
                println!("{between}: changed");
            } else if let (Some(ab), Some(ba)) = (&s.a_to_b, &s.b_to_a) {
                println!("a-to-b: {}", describe(ab));
                println!("b-to-a: {}", describe(ba));
            }
        }
        LabCmd::Exec { site, command } => {
            let sites = tern_lab::lab_sites();
            let Some(s) = sites.iter().find(|s| s.name == site) else {
                bail!(
                    "no site {site:?} (sites: {})",
                    sites
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let status = tern_lab::netns_command(&s.netns, &command[0])
                .args(&command[1..])
                .status()
                .context("run ip netns exec")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCmd::RouteClients { site } => {
            tern_lab::route_clients(&site)?;
            println!("client site routed to the overlay through site {site}");
        }
    }
    Ok(())
}
