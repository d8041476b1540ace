//! # tern-lab — the embedded two-site WAN world
//!
//! `tern lab up` builds two sites on one machine, joined only through tern's emulator:
//!
//! ```text
//!   netns tern-a                                              netns tern-b
//!   site0 (bridge) 198.18.1.1/24                               site0 (bridge) 198.18.2.1/24
//!   route 198.18.2.0/24 dev wan0          tern wan            route 198.18.1.0/24 dev wan0
//!   wan0 (TUN) ◀──────────────▶ [a-to-b | b-to-a link model] ◀──────────────▶ wan0 (TUN)
//! ```
//!
//! Every lab address is in 198.18.0.0/15 (RFC 2544 benchmarking range) and exists only
//! inside the namespaces the lab made. State lives in [`RUN_DIR`]: `state.json`, the
//! emulator's control socket and log. `down` removes everything by name, so it works after a
//! crash and when nothing is up.

use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_link::{DirectionConfig, JitterShape, LinkSpec, LossModel, Profile};
use tern_wan::proto::{Direction, Reply, Request, StatsReply};

/// Where the lab keeps its state (tmpfs: gone after a reboot, as the namespaces are).
pub const RUN_DIR: &str = "/run/tern/lab";
pub const WAN_DEV: &str = "wan0";
pub const SITE_DEV: &str = "site0";
/// Version of `state.json`.
pub const STATE_VERSION: u32 = 1;

/// A lab site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub name: String,
    pub netns: String,
    pub address: String,
    pub subnet: String,
    pub wan_dev: String,
}

/// The two sites.
pub fn sites() -> [Site; 2] {
    let site = |n: &str, i: u8| Site {
        name: n.into(),
        netns: format!("tern-{n}"),
        address: format!("198.18.{i}.1"),
        subnet: format!("198.18.{i}.0/24"),
        wan_dev: WAN_DEV.into(),
    };
    [site("a", 1), site("b", 2)]
}

/// The client site (`tern lab up --client-site`): no node, no VMs — clients that reach both
/// sites over emulated links of their own (`c-a`, `c-b`, the lab's profile) and the VM
/// overlay through site a until [`route_clients`] moves them (a failover does).
///
/// ```text
///   tern-c 198.18.3.1 ── wan-a ◀─[c-a link]─▶ wan-c ── tern-a ── overlay 198.18.100.0/24
///                      └ wan-b ◀─[c-b link]─▶ wan-c ── tern-b ──┘
/// ```
pub fn client_site() -> Site {
    Site {
        name: "c".into(),
        netns: "tern-c".into(),
        address: "198.18.3.1".into(),
        subnet: "198.18.3.0/24".into(),
        wan_dev: "wan-a".into(),
    }
}

/// The device in sites a and b toward the client site.
pub const CLIENT_DEV: &str = "wan-c";

/// The sites of the running lab: a, b, and c when it has a client site.
pub fn lab_sites() -> Vec<Site> {
    let mut v = sites().to_vec();
    if netns_exists(&client_site().netns) {
        v.push(client_site());
    }
    v
}

/// The overlay address of a site's TAP (a VM's gateway there): `198.18.100.N`.
pub fn overlay_gateway(site: &str) -> Option<String> {
    sites()
        .iter()
        .position(|s| s.name == site)
        .map(|i| format!("{OVERLAY_PREFIX}.{}", i + 1))
}

/// An emulated link of the client site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientLink {
    /// `c-a` or `c-b`; its a-to-b direction is client to site.
    pub name: String,
    pub pid: u32,
    pub control: PathBuf,
    pub log: PathBuf,
}

/// Points the client site's route to the VM overlay at `site` (`a` or `b`): what DNS or a
/// routing change does for clients after a failover.
pub fn route_clients(site: &str) -> Result<(), LabError> {
    let c = client_site();
    if !netns_exists(&c.netns) {
        return Err(LabError::Refused("the lab has no client site".into()));
    }
    if !sites().iter().any(|s| s.name == site) {
        return Err(LabError::Refused(format!("no site {site:?} (a or b)")));
    }
    run_in(
        &c.netns,
        "ip",
        &[
            "route",
            "replace",
            &format!("{OVERLAY_PREFIX}.0/24"),
            "dev",
            &format!("wan-{site}"),
            "src",
            &c.address,
        ],
    )?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, TUN devices); run it with sudo")]
    NotRoot,
    #[error(
        "/dev/net/tun is missing: load the tun module (modprobe tun) or run on a machine with TUN support"
    )]
    NoTun,
    #[error("a lab is already up (profile {profile}); run `tern lab down` first")]
    AlreadyUp { profile: String },
    #[error("no lab is up; start one with `tern lab up --profile NAME`")]
    NotUp,
    #[error(transparent)]
    Config(#[from] tern_link::ConfigError),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the link emulator did not start; its log ({log}) says:\n{tail}")]
    EmulatorFailed { log: String, tail: String },
    #[error(transparent)]
    Wan(#[from] tern_wan::WanError),
    #[error("the emulator refused the request: {0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Runs a command, returning stdout or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs `program` inside a site's namespace (`ip netns exec`).
pub fn netns_command(netns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, program]);
    c
}

/// Runs a command inside a site's namespace.
pub fn run_in(netns: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Changes to a link, as given on the command line; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct LinkChanges {
    pub profile: Option<String>,
    pub rate_bps: Option<u64>,
    pub rtt_us: Option<u64>,
    pub loss: Option<LossModel>,
    pub jitter_us: Option<u64>,
    pub jitter_shape: Option<JitterShape>,
    pub reorder: Option<bool>,
    pub queue_packets: Option<u32>,
    pub queue_bytes: Option<u64>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        self.profile.is_none()
            && self.rate_bps.is_none()
            && self.rtt_us.is_none()
            && self.loss.is_none()
            && self.jitter_us.is_none()
            && self.jitter_shape.is_none()
            && self.reorder.is_none()
            && self.queue_packets.is_none()
            && self.queue_bytes.is_none()
    }

    /// The whole link: the profile (default `baseline`) with the given overrides. The queue
    /// is one BDP of the resulting link unless set explicitly.
    pub fn to_spec(&self) -> Result<LinkSpec, LabError> {
        let mut spec = Profile::find(self.profile.as_deref().unwrap_or("baseline"))?.spec();
        if let Some(v) = self.rate_bps {
            spec.rate_bps = v;
        }
        if let Some(v) = self.rtt_us {
            spec.rtt_us = v;
        }
        if let Some(v) = self.loss {
            spec.loss = v;
        }
        if let Some(v) = self.jitter_us {
            spec.jitter_us = v;
        }
        if let Some(v) = self.jitter_shape {
            spec.jitter_shape = v;
        }
        if let Some(v) = self.reorder {
            spec.reorder = v;
        }
        if self.queue_packets.is_some() {
            spec.queue_packets = self.queue_packets;
        }
        if self.queue_bytes.is_some() {
            spec.queue_bytes = self.queue_bytes;
        }
        spec.direction().validate()?;
        Ok(spec)
    }

    /// Applies the changes to one running direction (`--profile` replaces everything first).
    pub fn apply(&self, current: &DirectionConfig) -> Result<DirectionConfig, LabError> {
        let mut c = match &self.profile {
            Some(_) => self.to_spec()?.direction(),
            None => current.clone(),
        };
        if self.profile.is_none() {
            if let Some(v) = self.rate_bps {
                c.rate_bps = v;
            }
            if let Some(v) = self.rtt_us {
                c.delay_us = v / 2;
            }
            if let Some(v) = self.loss {
                c.loss = v;
            }
            if let Some(v) = self.jitter_us {
                c.jitter_us = v;
            }
            if let Some(v) = self.jitter_shape {
                c.jitter_shape = v;
            }
            if let Some(v) = self.reorder {
                c.reorder = v;
            }
            if let Some(v) = self.queue_packets {
                c.queue_limit_packets = v;
                if self.queue_bytes.is_none() {
                    c.queue_limit_bytes = (u64::from(v) * 65_535).min(tern_link::MAX_QUEUE_BYTES);
                }
            }
            if let Some(v) = self.queue_bytes {
                c.queue_limit_bytes = v;
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// What `state.json` records about a running lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub profile: String,
    pub spec: LinkSpec,
    pub seed: u64,
    pub emulator_pid: u32,
    pub control_socket: PathBuf,
    pub emulator_log: PathBuf,
    pub pcap_dir: Option<PathBuf>,
    pub sites: Vec<Site>,
    /// The tern node of each site (overlay switch, migration relay; with `--accel` also
    /// transparent TCP acceleration).
    #[serde(default)]
    pub nodes: Vec<NodeInfo>,
    /// The client site's links (`--client-site`).
    #[serde(default)]
    pub client_links: Vec<ClientLink>,
}

/// A tern node the lab runs inside a site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub site: String,
    pub pid: u32,
    pub config: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub public_key: String,
}

/// `tern lab status` output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabStatus {
    pub up: bool,
    pub profile: Option<String>,
    pub sites: Vec<Site>,
    pub emulator_pid: Option<u32>,
    pub emulator_alive: bool,
    pub control_socket: Option<PathBuf>,
    pub emulator_log: Option<PathBuf>,
    pub a_to_b: Option<DirectionConfig>,
    pub b_to_a: Option<DirectionConfig>,
    /// tern nodes, one per site.
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub changes: LinkChanges,
    pub seed: u64,
    pub pcap_dir: Option<PathBuf>,
    /// Coalesce TCP trains into GSO writes (on by default; off to compare).
    pub gso: bool,
    /// The `tern` binary that runs the emulator daemon.
    pub tern_exe: PathBuf,
    /// Start a tern node in each site with fresh keys and transparent acceleration between
    /// the two site subnets.
    pub accel: bool,
    /// Add the client site `c` ([`client_site`]).
    pub client_site: bool,
    /// The nodes' `rekey_after_packets` (default: the transport's own); to measure rekeying.
    pub rekey_after_packets: Option<u64>,
}

fn state_path() -> PathBuf {
    Path::new(RUN_DIR).join("state.json")
}

pub fn read_state() -> Option<LabState> {
    let text = fs::read_to_string(state_path()).ok()?;
    serde_json::from_str(&text).ok()
}

fn pid_alive(pid: u32) -> bool {
    // Only our own emulator counts: a recycled pid running something else does not.
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("tern") && c.contains("wan")
        })
        .unwrap_or(false)
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn check_prerequisites() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(LabError::NoTun);
    }
    Ok(())
}

/// Lets new namespaces use cubic (a namespace may only pick from the root namespace's
/// allowed list, which on these machines is `reno bbr`). Benchmarks name their algorithm.
fn allow_cubic() -> Result<(), LabError> {
    let path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    let cur = fs::read_to_string(path).map_err(io_err(path))?;
    if !cur.split_whitespace().any(|c| c == "cubic") {
        fs::write(path, format!("{} cubic", cur.trim()))
            .map_err(io_err(format!("write {path}")))?;
    }
    Ok(())
}

/// A site's namespace: lo up, IPv6 off (no router solicitations or MLD reports crossing
/// the emulated links), the site LAN as a bridge `site0` with the site's address.
fn make_namespace(site: &Site) -> Result<(), LabError> {
    let ns = site.netns.as_str();
    run("ip", &["netns", "add", ns])?;
    run_in(ns, "ip", &["link", "set", "lo", "up"])?;
    run_in(
        ns,
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )?;
    run_in(ns, "ip", &["link", "add", SITE_DEV, "type", "bridge"])?;
    let cidr = format!("{}/24", site.address);
    run_in(ns, "ip", &["addr", "add", &cidr, "dev", SITE_DEV])?;
    run_in(ns, "ip", &["link", "set", SITE_DEV, "up"])?;
    Ok(())
}

/// A persistent TUN device in a namespace, up, MTU 1500 (an emulator's end of a link).
fn make_tun(ns: &str, dev: &str) -> Result<(), LabError> {
    run_in(ns, "ip", &["tuntap", "add", "dev", dev, "mode", "tun"])?;
    run_in(
        ns,
        "ip",
        &[
            "link",
            "set",
            dev,
            "mtu",
            "1500",
            "txqueuelen",
            "1000",
            "up",
        ],
    )?;
    Ok(())
}

fn make_site(site: &Site, peer: &Site) -> Result<(), LabError> {
    let ns = site.netns.as_str();
    make_namespace(site)?;
    make_tun(ns, WAN_DEV)?;
    run_in(
        ns,
        "ip",
        &[
            "route",
            "add",
            &peer.subnet,
            "dev",
            WAN_DEV,
            "src",
            &site.address,
        ],
    )?;
    Ok(())
}

/// The client site's namespace and devices, and the devices toward it in a and b (which
/// route between it and the overlay).
fn make_client_site(c: &Site, a: &Site, b: &Site) -> Result<(), LabError> {
    let ns = c.netns.as_str();
    make_namespace(c)?;
    for site in [a, b] {
        let dev = format!("wan-{}", site.name);
        make_tun(ns, &dev)?;
        run_in(
            ns,
            "ip",
            &["route", "add", &site.subnet, "dev", &dev, "src", &c.address],
        )?;
        make_tun(&site.netns, CLIENT_DEV)?;
        run_in(
            &site.netns,
            "ip",
            &[
                "route",
                "add",
                &c.subnet,
                "dev",
                CLIENT_DEV,
                "src",
                &site.address,
            ],
        )?;
        // Site a and b route between the client site and the VM overlay.
        run_in(&site.netns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    }
    run_in(
        ns,
        "ip",
        &[
            "route",
            "add",
            &format!("{OVERLAY_PREFIX}.0/24"),
            "dev",
            &format!("wan-{}", a.name),
            "src",
            &c.address,
        ],
    )?;
    Ok(())
}

/// Brings the lab up. Left-overs of a crashed lab are removed first; a live lab is an error.
pub fn up(opts: &UpOptions) -> Result<LabState, LabError> {
    check_prerequisites()?;
    let spec = opts.changes.to_spec()?;
    if let Some(st) = read_state() {
        if pid_alive(st.emulator_pid) {
            return Err(LabError::AlreadyUp {
                profile: st.profile,
            });
        }
    }
    down()?;
    allow_cubic()?;
    fs::create_dir_all(RUN_DIR).map_err(io_err(format!("create {RUN_DIR}")))?;
    let [a, b] = sites();
    let result = (|| {
        make_site(&a, &b)?;
        make_site(&b, &a)?;
        let mut state = start_emulator(opts, &spec, &a, &b)?;
        state.nodes = start_nodes(&opts.tern_exe, &a, &b, opts.accel, opts.rekey_after_packets)?;
        if opts.client_site {
            let c = client_site();
            make_client_site(&c, &a, &b)?;
            for peer in [&a, &b] {
                let name = format!("c-{}", peer.name);
                let control = Path::new(RUN_DIR).join(format!("wan-{name}.sock"));
                let log = Path::new(RUN_DIR).join(format!("wan-{name}.log"));
                let dev = format!("wan-{}", peer.name);
                let pid = spawn_wan(
                    opts,
                    &spec,
                    (c.netns.as_str(), dev.as_str()),
                    (peer.netns.as_str(), CLIENT_DEV),
                    &control,
                    &log,
                )?;
                state.client_links.push(ClientLink {
                    name,
                    pid,
                    control,
                    log,
                });
                write_state(&state)?;
            }
            state.sites.push(c);
        }
        write_state(&state)?;
        let on_failover = opts.client_site.then(|| {
            vec![
                opts.tern_exe.to_string_lossy().into_owned(),
                "lab".into(),
                "route-clients".into(),
            ]
        });
        lab_cluster(&state.profile, on_failover)
            .write(Path::new(tern_cluster::LAB_PATH))
            .map_err(io_err(format!("write {}", tern_cluster::LAB_PATH)))?;
        Ok(state)
    })();
    match result {
        Ok(state) => Ok(state),
        Err(e) => {
            let _ = down();
            Err(e)
        }
    }
}

fn start_emulator(
    opts: &UpOptions,
    spec: &LinkSpec,
    a: &Site,
    b: &Site,
) -> Result<LabState, LabError> {
    let control = Path::new(RUN_DIR).join("wan.sock");
    let log_path = Path::new(RUN_DIR).join("wan.log");
    let pid = spawn_wan(
        opts,
        spec,
        (&a.netns, WAN_DEV),
        (&b.netns, WAN_DEV),
        &control,
        &log_path,
    )?;
    let state = LabState {
        version: STATE_VERSION,
        profile: opts
            .changes
            .profile
            .clone()
            .unwrap_or_else(|| "custom".into()),
        spec: spec.clone(),
        seed: opts.seed,
        emulator_pid: pid,
        control_socket: control,
        emulator_log: log_path,
        pcap_dir: opts.pcap_dir.clone(),
        sites: sites().to_vec(),
        nodes: Vec::new(),
        client_links: Vec::new(),
    };
    write_state(&state)?;
    Ok(state)
}

/// Starts one `tern wan` emulator between two (netns, TUN device) ends; returns its pid once
/// its control socket answers.
fn spawn_wan(
    opts: &UpOptions,
    spec: &LinkSpec,
    (a_netns, a_dev): (&str, &str),
    (b_netns, b_dev): (&str, &str),
    control: &Path,
    log_path: &Path,
) -> Result<u32, LabError> {
    let log =
        fs::File::create(log_path).map_err(io_err(format!("create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io_err("dup log"))?;
    let spec_json = serde_json::to_string(spec).map_err(|e| LabError::Refused(e.to_string()))?;
    let mut cmd = Command::new(&opts.tern_exe);
    cmd.args([
        "wan",
        "--a-netns",
        a_netns,
        "--a-dev",
        a_dev,
        "--b-netns",
        b_netns,
        "--b-dev",
        b_dev,
    ])
    .arg("--control")
    .arg(control)
    .args(["--spec-json", &spec_json, "--seed", &opts.seed.to_string()]);
    if let Some(dir) = &opts.pcap_dir {
        cmd.arg("--pcap-dir").arg(dir);
    }
    if !opts.gso {
        cmd.arg("--no-gso");
    }
    // Own process group: a Ctrl-C in the terminal that ran `lab up` does not stop the link.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(io_err(format!("start {}", opts.tern_exe.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if let Ok(Reply::Stats(_)) = tern_wan::request(control, &Request::Stats) {
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    let tail = fs::read_to_string(log_path).unwrap_or_default();
    let tail: String = tail
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(LabError::EmulatorFailed {
        log: log_path.display().to_string(),
        tail,
    })
}

fn write_state(state: &LabState) -> Result<(), LabError> {
    let text = serde_json::to_string_pretty(state).map_err(|e| LabError::Refused(e.to_string()))?;
    let tmp = state_path().with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err("write state"))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("write state"))?;
    f.sync_all().map_err(io_err("write state"))?;
    fs::rename(&tmp, state_path()).map_err(io_err("write state"))?;
    Ok(())
}

/// The lab as a cluster file ([`tern_cluster::LAB_PATH`]): its two sites, each a network
/// namespace with a node, an overlay switch and the emulated link between them.
/// `on_failover`: the lab's client site is rerouted (`tern lab route-clients SITE`).
pub fn lab_cluster(profile: &str, on_failover: Option<Vec<String>>) -> tern_cluster::Cluster {
    let sites = sites()
        .iter()
        .map(|s| tern_cluster::Site {
            name: s.name.clone(),
            address: s.address.parse().expect("a lab address"),
            node: format!("site-{}", s.name),
            control: node_control_socket(&s.name),
            migrate: migrate_socket(&s.name),
            switch: Some(switch_socket(&s.name)),
            overlay_gateway: overlay_gateway(&s.name).and_then(|g| g.parse().ok()),
            netns: Some(s.netns.clone()),
        })
        .collect();
    tern_cluster::Cluster {
        path: tern_cluster::LAB_PATH.into(),
        vm_dir: VM_DIR.into(),
        direct_ports: DIRECT_PORTS,
        link_control: Some(Path::new(RUN_DIR).join("wan.sock")),
        profile: Some(profile.to_string()),
        on_failover,
        sites,
    }
}

/// The VM overlay (one L2 segment across the sites); site N's TAP is `.N`.
pub const OVERLAY_PREFIX: &str = "198.18.100";
pub const OVERLAY_TAP: &str = "ternov0";
/// Where VM state lives; remote migration targets must be sockets under it.
pub const VM_DIR: &str = "/run/tern/vm";
/// TCP destination ports the nodes never intercept (QEMU-to-QEMU `--direct` migration).
pub const DIRECT_PORTS: (u16, u16) = (7450, 7499);

/// The overlay switch socket of a site (QEMU `-netdev stream` connects here).
pub fn switch_socket(site: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("switch-{site}.sock"))
}

/// The migration relay socket of a site's node.
pub fn migrate_socket(site: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("migrate-{site}.sock"))
}

/// The control socket of a site's node (`tern_node::request_status`).
pub fn node_control_socket(site: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("node-{site}.sock"))
}

/// Where each site's node keeps its content store (tern-codec `store`); it outlives the
/// lab, so a VM that comes back finds its pages.
pub const STORE_DIR: &str = "/var/lib/tern/store";

/// The content store directory of a site's node.
pub fn store_dir(site: &str) -> PathBuf {
    Path::new(STORE_DIR).join(site)
}

/// Capacity of each lab node's content store, MiB.
pub const STORE_MB: u64 = 2048;

/// Site-agent commands each lab site lets the other call (`docs/agent.md`): what `tern
/// migrate` and `tern protect` will ask of the far site. Stopping or starting a VM at the
/// other site is not among them; a test checks the refusal.
pub const LAB_AGENT_COMMANDS: &[&str] = &["vm.list", "vm.status", "vm.spec", "disk.status"];

/// UDP port of the lab's tern nodes.
pub const NODE_PORT: u16 = 7400;

/// Writes keys and configs for a node per site and starts them; returns when both report
/// their peer connected.
fn start_nodes(
    tern_exe: &Path,
    a: &Site,
    b: &Site,
    accel: bool,
    rekey_after_packets: Option<u64>,
) -> Result<Vec<NodeInfo>, LabError> {
    use tern_transport::crypto::{StaticKeypair, encode_key};
    /// SCHED_FIFO priority of a node's loop while it sends (tern-node `realtime_priority`).
    const LAB_REALTIME_PRIORITY: u8 = 10;
    let keys = [
        StaticKeypair::generate().map_err(|e| LabError::Refused(e.to_string()))?,
        StaticKeypair::generate().map_err(|e| LabError::Refused(e.to_string()))?,
    ];
    let sites = [a, b];
    let mut nodes = Vec::new();
    for i in 0..2 {
        let (me, peer) = (sites[i], sites[1 - i]);
        let dir = Path::new(RUN_DIR);
        let key_path = dir.join(format!("node-{}.key", me.name));
        write_private(&key_path, &encode_key(&keys[i].private))?;
        let control = node_control_socket(&me.name);
        let accelerate = if accel {
            format!(
                "\n[[accelerate]]\nsubnet = \"{}\"\npeer = \"site-{}\"\n",
                peer.subnet, peer.name
            )
        } else {
            String::new()
        };
        // The peer's accelerated TCP ends at this site's subnet, and nowhere else.
        let tcp_targets = if accel {
            format!("tcp_targets = [\"{}\"]\n", me.subnet)
        } else {
            String::new()
        };
        let config = format!(
            "# Written by `tern lab up`.\n\
             [node]\nname = \"site-{me_name}\"\nprivate_key_file = \"{key}\"\n\
             listen = \"{me_addr}:{port}\"\ncontrol = \"{control}\"\n\
             metrics = \"127.0.0.1:9464\"\nbypass_ports = \"{bp0}-{bp1}\"\n\
             realtime_priority = {LAB_REALTIME_PRIORITY}\n{rekey}\n\
             [[peer]]\nname = \"site-{peer_name}\"\npublic_key = \"{peer_key}\"\n\
             address = \"{peer_addr}:{port}\"\n\
             allow = [\"overlay\", \"migration\", \"replication\"]\n{tcp_targets}\
             agent = [{agent}]\n\n\
             [overlay]\nsocket = \"{switch}\"\ntap = \"{OVERLAY_TAP}\"\n\
             tap_address = \"{OVERLAY_PREFIX}.{index}/24\"\n\n\
             [migration]\nsocket = \"{migrate}\"\ntarget_dir = \"{VM_DIR}\"\n\
             store = \"{store}\"\nstore_mb = {STORE_MB}\n{accelerate}",
            agent = LAB_AGENT_COMMANDS
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", "),
            rekey = rekey_after_packets
                .map(|n| format!("rekey_after_packets = {n}\n"))
                .unwrap_or_default(),
            store = store_dir(&me.name).display(),
            bp0 = DIRECT_PORTS.0,
            bp1 = DIRECT_PORTS.1,
            switch = switch_socket(&me.name).display(),
            migrate = migrate_socket(&me.name).display(),
            index = i + 1,
            me_name = me.name,
            key = key_path.display(),
            me_addr = me.address,
            port = NODE_PORT,
            control = control.display(),
            peer_name = peer.name,
            peer_key = encode_key(&keys[1 - i].public),
            peer_addr = peer.address,
        );
        let config_path = dir.join(format!("node-{}.toml", me.name));
        fs::write(&config_path, config)
            .map_err(io_err(format!("write {}", config_path.display())))?;
        let log_path = dir.join(format!("node-{}.log", me.name));
        let log = fs::File::create(&log_path)
            .map_err(io_err(format!("create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log"))?;
        let child = netns_command(&me.netns, &tern_exe.display().to_string())
            .args(["node", "run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(io_err(format!("start tern node in {}", me.netns)))?;
        nodes.push(NodeInfo {
            site: me.name.clone(),
            pid: child.id(),
            config: config_path,
            control,
            log: log_path,
            public_key: encode_key(&keys[i].public),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let connected = nodes.iter().all(|n| {
            tern_node::request_status(&n.control)
                .map(|s| s.peers.iter().all(|p| p.connected))
                .unwrap_or(false)
        });
        if connected {
            return Ok(nodes);
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| {
                    format!(
                        "{}: {}",
                        n.log.display(),
                        fs::read_to_string(&n.log).unwrap_or_default().trim()
                    )
                })
                .collect();
            return Err(LabError::Refused(format!(
                "tern nodes did not connect within 15 s\n{}",
                logs.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), LabError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("write {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(format!("write {}", path.display())))
}

/// Removes everything the lab made. Idempotent; works after a crash.
pub fn down() -> Result<(), LabError> {
    check_prerequisites()?;
    if let Some(st) = read_state() {
        let _ = tern_wan::request(&st.control_socket, &Request::Shutdown);
        let deadline = Instant::now() + Duration::from_secs(3);
        while pid_alive(st.emulator_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(st.emulator_pid) {
            // SAFETY: kill with a pid we started and have just checked is our emulator.
            unsafe { libc::kill(st.emulator_pid as i32, libc::SIGKILL) };
        }
        for l in &st.client_links {
            let _ = tern_wan::request(&l.control, &Request::Shutdown);
            std::thread::sleep(Duration::from_millis(50));
            if pid_alive(l.pid) {
                // SAFETY: as above, one of our client-link emulators.
                unsafe { libc::kill(l.pid as i32, libc::SIGKILL) };
            }
            let _ = fs::remove_file(&l.control);
        }
    }
    for site in sites().into_iter().chain([client_site()]) {
        if netns_exists(&site.netns) {
            // Processes left inside (iperf3 servers, shells) would keep the namespace alive.
            if let Ok(pids) = run("ip", &["netns", "pids", &site.netns]) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill with a pid the kernel listed inside the lab's own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            run("ip", &["netns", "del", &site.netns])?;
        }
    }
    for f in [
        "cluster.toml",
        "state.json",
        "wan.sock",
        "state.tmp",
        "node-a.sock",
        "node-b.sock",
        "node-a.key",
        "node-b.key",
    ] {
        let _ = fs::remove_file(Path::new(RUN_DIR).join(f));
    }
    Ok(())
}

fn require_up() -> Result<LabState, LabError> {
    read_state()
        .filter(|s| pid_alive(s.emulator_pid))
        .ok_or(LabError::NotUp)
}

pub fn stats() -> Result<StatsReply, LabError> {
    link_stats(&require_up()?.control_socket)
}

/// IP bytes offered to the emulated a-b link so far: (a to b, b to a); zeros when no lab
/// is up.
pub fn offered_bytes() -> (u64, u64) {
    stats()
        .map(|s| {
            (
                s.a_to_b.stats.counters.offered_bytes,
                s.b_to_a.stats.counters.offered_bytes,
            )
        })
        .unwrap_or((0, 0))
}

/// The counters of the emulator behind `control`.
fn link_stats(control: &Path) -> Result<StatsReply, LabError> {
    match tern_wan::request(control, &Request::Stats)? {
        Reply::Stats(s) => Ok(*s),
        Reply::Error { message } => Err(LabError::Refused(message)),
        Reply::Ok => Err(LabError::Refused("unexpected reply".into())),
    }
}

pub fn status() -> Result<LabStatus, LabError> {
    let Some(st) = read_state() else {
        return Ok(LabStatus {
            up: false,
            profile: None,
            sites: vec![],
            emulator_pid: None,
            emulator_alive: false,
            control_socket: None,
            emulator_log: None,
            a_to_b: None,
            b_to_a: None,
            nodes: Vec::new(),
        });
    };
    let alive = pid_alive(st.emulator_pid);
    let live = if alive { stats().ok() } else { None };
    Ok(LabStatus {
        up: alive && sites().iter().all(|s| netns_exists(&s.netns)),
        profile: Some(st.profile),
        sites: st.sites,
        emulator_pid: Some(st.emulator_pid),
        emulator_alive: alive,
        control_socket: Some(st.control_socket),
        emulator_log: Some(st.emulator_log),
        a_to_b: live.as_ref().map(|s| s.a_to_b.config.clone()),
        b_to_a: live.as_ref().map(|s| s.b_to_a.config.clone()),
        nodes: st.nodes,
    })
}

/// Changes the running link; `directions` empty means both.
pub fn set(changes: &LinkChanges, directions: &[Direction]) -> Result<(), LabError> {
    set_link("a-b", changes, directions)
}

/// Changes one running link: `a-b`, or the client site's `c-a` / `c-b` (a-to-b is client
/// to site); `directions` empty means both.
pub fn set_link(
    link: &str,
    changes: &LinkChanges,
    directions: &[Direction],
) -> Result<(), LabError> {
    let st = require_up()?;
    let control = if link == "a-b" {
        st.control_socket.clone()
    } else {
        st.client_links
            .iter()
            .find(|l| l.name == link)
            .map(|l| l.control.clone())
            .ok_or_else(|| {
                LabError::Refused(format!(
                    "no link {link:?} (a-b{})",
                    if st.client_links.is_empty() {
                        "; the client site's c-a and c-b come with `lab up --client-site`"
                    } else {
                        ", c-a, c-b"
                    }
                ))
            })?
    };
    let current = link_stats(&control)?;
    let dirs: Vec<Direction> = if directions.is_empty() {
        vec![Direction::AToB, Direction::BToA]
    } else {
        directions.to_vec()
    };
    // Validate both before changing either.
    let mut planned = Vec::new();
    for d in dirs {
        let cur = match d {
            Direction::AToB => &current.a_to_b.config,
            Direction::BToA => &current.b_to_a.config,
        };
        planned.push((d, changes.apply(cur)?));
    }
    for (direction, config) in planned {
        match tern_wan::request(&control, &Request::Set { direction, config })? {
            Reply::Ok => {}
            Reply::Error { message } => return Err(LabError::Refused(message)),
            Reply::Stats(_) => return Err(LabError::Refused("unexpected reply".into())),
        }
    }
    if let (Some(p), "a-b") = (&changes.profile, link) {
        let mut st = st;
        st.profile = p.clone();
        st.spec = changes.to_spec()?;
        if let Ok(text) = serde_json::to_string_pretty(&st) {
            let _ = fs::write(state_path(), text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster file the lab writes is one `tern-cluster` reads back whole: both sites'
    /// namespaces, node sockets, switches and gateways, the emulator, the failover hook.
    #[test]
    fn the_lab_cluster_file_reads_back() {
        let hook = vec![
            "/usr/bin/tern".to_string(),
            "lab".into(),
            "route-clients".into(),
        ];
        let c = lab_cluster("mpls", Some(hook.clone()));
        let back =
            tern_cluster::Cluster::parse(&c.to_toml(), Path::new(tern_cluster::LAB_PATH)).unwrap();
        assert_eq!(back, c);
        let b = back.site("b").unwrap();
        assert_eq!(b.netns.as_deref(), Some("tern-b"));
        assert_eq!(b.node, "site-b");
        assert_eq!(b.migrate, migrate_socket("b"));
        assert_eq!(b.switch, Some(switch_socket("b")));
        assert_eq!(
            b.overlay_gateway.map(|g| g.to_string()).as_deref(),
            Some("198.18.100.2")
        );
        assert_eq!(back.on_failover, Some(hook));
        assert_eq!(back.direct_ports, DIRECT_PORTS);
    }
}
