//! VM lifecycle: QEMU guests inside a lab site's network namespace.
//!
//! A VM is a name plus a machine ([`VmSpec`]). It has one or two *instances*, each a QEMU
//! process at a site with its own directory:
//!
//! ```text
//! /run/tern/vm/
//!   .lock                  flock: start/promote/stop of any VM are serialized
//!   web/                   the VM "web"
//!     a/                   its instance at site a
//!       spec.json          InstanceRecord: the resolved VmSpec, site, netns, role, pid,
//!                          socket and log paths, argv, incoming URI
//!       qmp.sock           control monitor (QmpClient via `qmp()`; one client at a time)
//!       qmp-status.sock    second monitor for `list`/`stop`, usable while a controller
//!                          holds qmp.sock (e.g. during a migration)
//!       serial.log         the guest's ttyS0
//!       qemu.pid           written by QEMU (-pidfile)
//!       qemu.log           QEMU's stderr when it failed to start
//!     b/                   during a migration: the destination (role "incoming")
//! ```
//!
//! `start` makes the primary instance; `start_incoming` adds a destination instance at
//! another site, started with `-incoming URI`; after a successful migration `promote`
//! stops the source and makes the destination the primary. `stop` ends every instance of
//! a VM and removes its directory.

use std::fmt;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::client::{ClientError, QmpClient};

/// Where VM instances keep their state (tmpfs, like the lab's).
pub const VM_RUN_DIR: &str = "/run/tern/vm";
/// Version of `spec.json`.
pub const RECORD_VERSION: u32 = 1;
pub const QEMU: &str = "qemu-system-x86_64";
pub const DEFAULT_KERNEL: &str = "/var/lib/tern/guest/vmlinuz";
pub const DEFAULT_INITRD: &str = "/var/lib/tern/guest/initrd.img";
pub const DEFAULT_MEM_MIB: u32 = 512;
pub const MIN_MEM_MIB: u32 = 64;
pub const MAX_MEM_MIB: u32 = 16 << 10;
pub const MAX_SMP: u32 = 8;
pub const MAX_NAME_BYTES: usize = 32;
/// Longest kernel command line (x86 Linux `COMMAND_LINE_SIZE` is 2048 with the NUL).
pub const MAX_CMDLINE_BYTES: usize = 2047;
/// Guest RAM is `mem_mib` MiB plus this much, so that it is never a multiple of 256 KiB:
/// QEMU 7.2 under TCG loses dirty pages during migration when it is (see `docs/vm.md`).
pub const RAM_PAD_KIB: u64 = 4;
/// The guests' own subnet, stretched across both sites.
pub const GUEST_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 0);
pub const GUEST_PREFIX: u8 = 24;
/// Automatic addresses are .10 upwards.
pub const FIRST_GUEST_HOST: u8 = 10;
/// Share of guest memory the workload's data set takes unless given.
pub const DEFAULT_WORKLOAD_PERCENT: u32 = 70;

/// Waiting for a new QEMU's monitor.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(15);
/// `list` and `stop` per instance.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// From `quit` to the process gone, before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    NoCluster(String),
    #[error("{0}")]
    Cluster(#[source] tern_cluster::ClusterError),
    #[error(
        "site {site}'s network namespace {netns} does not exist (the cluster file {path} \
         says its VMs run there; is the lab up? `tern lab up`)"
    )]
    NoNetns {
        site: String,
        netns: String,
        path: PathBuf,
    },
    #[error("invalid VM name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("invalid site name {0:?}: use letters, digits and '-'")]
    BadSite(String),
    #[error("memory of {mem_mib} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)")]
    MemOutOfRange { mem_mib: u32 },
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("a VM named {name} is already running (instance at site {site}); stop it first")]
    AlreadyExists { name: String, site: String },
    #[error("VM {name} already has an instance at site {site}")]
    InstanceExists { name: String, site: String },
    #[error("no VM named {0}")]
    NotFound(String),
    #[error("VM {name} has no instance at site {site}")]
    NoInstance { name: String, site: String },
    #[error("address {ip} is taken by VM {by}")]
    IpInUse { ip: Ipv4Addr, by: String },
    #[error("MAC {mac} is taken by VM {by}; give another with --mac")]
    MacInUse { mac: MacAddr, by: String },
    #[error("no free guest address left in {GUEST_NET}/{GUEST_PREFIX}")]
    NoFreeIp,
    #[error("VM {name} at site {site}: disk server: {msg}")]
    Disk {
        name: String,
        site: String,
        msg: String,
    },
    #[error("QEMU did not start VM {name} at site {site} ({status}): {stderr}")]
    QemuFailed {
        name: String,
        site: String,
        status: String,
        stderr: String,
    },
    #[error("VM {name} at site {site}: QMP")]
    Qmp {
        name: String,
        site: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("VM {name} at site {site} (pid {pid}) survived SIGKILL")]
    NotStopped {
        name: String,
        site: String,
        pid: u32,
    },
    #[error("VM record {path} is unreadable")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("VM record {path} has version {found}; this tern reads version {RECORD_VERSION}")]
    RecordVersion { path: PathBuf, found: u32 },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// An IPv4 address with its prefix length, written `198.18.100.10/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    /// `A.B.C.D/P`; without `/P` the guest network's prefix (24) is meant.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "24"));
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address (A.B.C.D/P)"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("{s:?} has a bad prefix length (1..=32)"))?;
        Ok(Ipv4Cidr { addr, prefix })
    }
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The VM's default MAC: QEMU's locally administered prefix 52:54:00 and 24 bits of an
    /// FNV-1a hash of the name (stable across Rust versions and machines, unlike
    /// `DefaultHasher`).
    pub fn for_name(name: &str) -> MacAddr {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let [.., x, y, z] = h.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, x, y, z])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (xx:xx:xx:xx:xx:xx)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (o, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("{s} is a multicast address"));
        }
        Ok(MacAddr(m))
    }
}

/// Serde as the type's text form (`Display` / `FromStr`), e.g. "198.18.100.10/24".
macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_via_str!(Ipv4Cidr, MacAddr);

/// The machine: what is the same at every site the VM runs at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// 1..=32 of `[A-Za-z0-9_-]`, starting with a letter or digit.
    pub name: String,
    /// The site of the primary instance.
    pub site: String,
    pub mem_mib: u32,
    pub smp: u32,
    /// Workload the guest runs (`tern.workload=`), e.g. `web-db`; `None`: idle.
    pub workload: Option<String>,
    /// Size of the workload's data set (`tern.mem_mb=`); default 70% of `mem_mib`.
    pub workload_mib: Option<u32>,
    /// Rate at which the workload writes, in MB/s (`tern.rate=`); `None`: the guest's
    /// default.
    pub workload_rate_mb_s: Option<u32>,
    /// Seed of the workload (`tern.seed=`).
    pub seed: Option<u64>,
    /// Guest address (`tern.ip=`); `None`: the lowest free one from 198.18.100.10.
    pub ip: Option<Ipv4Cidr>,
    /// `None`: [`MacAddr::for_name`].
    pub mac: Option<MacAddr>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel command-line words, after tern's own keys.
    pub append: Option<String>,
    /// A raw or qcow2 image (detected by its magic bytes) attached as virtio-blk.
    pub disk: Option<PathBuf>,
    /// A tern volume (sparse raw file) served by a `tern disk serve` of this instance over
    /// NBD and attached as virtio-blk; the guest mounts it (`tern.disk=vda`). Replicated
    /// and migrated with `tern migrate --with-disk`. Exclusive with `disk`.
    #[serde(default)]
    pub volume: Option<PathBuf>,
    /// PipeCloud's output gate: the NIC goes through the volume's disk server, and frames
    /// the guest sends wait until the disk writes before them are committed at the
    /// secondary. Needs `volume` and `net_socket`.
    #[serde(default)]
    pub gate: bool,
    /// Other gated VMs of the same protected application at the same site (PipeCloud's
    /// tiers): frames to them are not held but carry this VM's write clock, and this VM's
    /// frames to anyone else also wait for their disks. Needs `gate`.
    #[serde(default)]
    pub gate_peers: Vec<String>,
    /// The site switch's Unix socket; the VM gets a virtio-net NIC connected to it.
    /// `None`: no NIC.
    pub net_socket: Option<PathBuf>,
    /// The guest's default gateway (with `ip`): the site's `overlay_gateway` in the cluster
    /// file, filled in when the VM starts there.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl VmSpec {
    /// A spec with the defaults: 512 MiB, one vCPU, idle, the tern guest kernel and initrd,
    /// automatic IP and MAC, no disk, no NIC.
    pub fn new(name: &str, site: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            site: site.into(),
            mem_mib: DEFAULT_MEM_MIB,
            smp: 1,
            workload: None,
            workload_mib: None,
            workload_rate_mb_s: None,
            seed: None,
            ip: None,
            mac: None,
            kernel: DEFAULT_KERNEL.into(),
            initrd: DEFAULT_INITRD.into(),
            append: None,
            disk: None,
            volume: None,
            gate: false,
            gate_peers: Vec::new(),
            net_socket: None,
            gateway: None,
        }
    }

    pub fn mac_or_default(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::for_name(&self.name))
    }
}

/// Guest RAM in KiB for `mem_mib`: never a multiple of 256 KiB.
pub fn ram_kib(mem_mib: u32) -> u64 {
    u64::from(mem_mib) * 1024 + RAM_PAD_KIB
}

/// The guest kernel command line: tern's keys, then `spec.append`.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut words = vec!["console=ttyS0".to_string(), "quiet".to_string()];
    if let Some(ip) = spec.ip {
        words.push(format!("tern.ip={ip}"));
        // The site's overlay gateway routes to everything beyond the overlay.
        if let Some(gw) = spec.gateway {
            words.push(format!("tern.gw={gw}"));
        }
    }
    if let Some(w) = &spec.workload {
        words.push(format!("tern.workload={w}"));
        let data_mib = spec
            .workload_mib
            .unwrap_or(spec.mem_mib * DEFAULT_WORKLOAD_PERCENT / 100);
        words.push(format!("tern.mem_mb={data_mib}"));
    } else {
        // Idle for real: the init's default would run web-db, whose writes and checksum
        // passes take a TCG guest's CPU (and skew what runs beside it).
        words.push("tern.workload=idle".to_string());
        words.push("tern.mem_mb=1".to_string());
    }
    if let Some(r) = spec.workload_rate_mb_s {
        words.push(format!("tern.rate={r}"));
    }
    if let Some(s) = spec.seed {
        words.push(format!("tern.seed={s}"));
    }
    if spec.volume.is_some() {
        words.push("tern.disk=vda".to_string());
    }
    if let Some(a) = spec.append.as_deref().filter(|a| !a.trim().is_empty()) {
        words.push(a.trim().to_string());
    }
    words.join(" ")
}

/// Disk image formats tern attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// qcow2 by its magic (`QFI\xfb`), raw otherwise.
    pub fn detect(path: &Path) -> io::Result<DiskFormat> {
        let mut magic = [0u8; 4];
        let mut f = fs::File::open(path)?;
        let n = f.read(&mut magic)?;
        Ok(if n == 4 && magic == *b"QFI\xfb" {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Files of one instance (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancePaths {
    pub dir: PathBuf,
    pub record: PathBuf,
    pub qmp_socket: PathBuf,
    pub status_socket: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
}

impl InstancePaths {
    pub fn new(root: &Path, name: &str, site: &str) -> InstancePaths {
        let dir = root.join(name).join(site);
        InstancePaths {
            record: dir.join("spec.json"),
            qmp_socket: dir.join("qmp.sock"),
            status_socket: dir.join("qmp-status.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.log"),
            dir,
        }
    }
}

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// THE instance of the VM.
    Primary,
    /// The destination of a migration, until promoted.
    Incoming,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Incoming => "incoming",
        })
    }
}

/// `spec.json` of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub version: u32,
    /// The machine, resolved: `ip` and `mac` are set, `site` is this instance's site.
    pub spec: VmSpec,
    pub site: String,
    /// Namespace QEMU runs in (`None`: the caller's, for tests).
    pub netns: Option<String>,
    pub role: Role,
    pub incoming_uri: Option<String>,
    pub pid: u32,
    pub paths: InstancePaths,
    pub disk_format: Option<DiskFormat>,
    pub argv: Vec<String>,
    pub started_unix_s: u64,
}

/// One instance as `list` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub site: String,
    pub role: Role,
    /// QEMU's run state from `query-status` (`running`, `paused`, `inmigrate`,
    /// `postmigrate`, `prelaunch`, …), `dead` when the process is gone, `unresponsive`
    /// when it lives but its status monitor does not answer.
    pub state: String,
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub dir: PathBuf,
    pub mem_mib: u32,
    pub ip: Option<Ipv4Cidr>,
    pub mac: MacAddr,
    pub workload: Option<String>,
    pub netns: Option<String>,
    pub incoming_uri: Option<String>,
}

impl VmInfo {
    fn new(rec: &InstanceRecord, state: String) -> VmInfo {
        VmInfo {
            name: rec.spec.name.clone(),
            site: rec.site.clone(),
            role: rec.role,
            state,
            pid: rec.pid,
            qmp_socket: rec.paths.qmp_socket.clone(),
            serial_log: rec.paths.serial_log.clone(),
            dir: rec.paths.dir.clone(),
            mem_mib: rec.spec.mem_mib,
            ip: rec.spec.ip,
            mac: rec.spec.mac_or_default(),
            workload: rec.spec.workload.clone(),
            netns: rec.netns.clone(),
            incoming_uri: rec.incoming_uri.clone(),
        }
    }
}

/// QEMU's option syntax: a comma inside a value is written twice.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The complete QEMU command line of an instance (`argv[0]` is [`QEMU`]).
///
/// `-nodefaults` keeps QEMU from adding devices (VGA, NIC with option ROM, floppy,
/// CD-ROM, monitor) that the destination of a migration must then match; the two monitors
/// and the serial port are explicit. RAM is [`ram_kib`]. `incoming` is the
/// `-incoming` URI of a migration destination (`defer`, `unix:PATH`, `fd:N`, `tcp:…`).
/// `paused` adds `-S`: the guest does not run until `cont` (for a destination: it stays
/// paused after the migration completes).
pub fn guest_argv(
    spec: &VmSpec,
    paths: &InstancePaths,
    disk_format: Option<DiskFormat>,
    incoming: Option<&str>,
    paused: bool,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[QEMU, "-name", &spec.name]);
    push(&["-machine", "pc,accel=tcg", "-nodefaults", "-no-user-config"]);
    push(&["-m", &format!("{}K", ram_kib(spec.mem_mib))]);
    push(&["-smp", &spec.smp.to_string(), "-display", "none"]);
    push(&["-kernel", &spec.kernel.to_string_lossy()]);
    push(&["-initrd", &spec.initrd.to_string_lossy()]);
    push(&["-append", &kernel_cmdline(spec)]);
    push(&[
        "-serial",
        &format!("file:{}", paths.serial_log.to_string_lossy()),
    ]);
    for sock in [&paths.qmp_socket, &paths.status_socket] {
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qemu_escape(sock)),
        ]);
    }
    if let Some(disk) = &spec.disk {
        let fmt = disk_format.unwrap_or(DiskFormat::Raw);
        push(&[
            "-drive",
            &format!(
                "if=none,id=d0,file={},format={}",
                qemu_escape(disk),
                fmt.as_str()
            ),
            "-device",
            "virtio-blk-pci,drive=d0",
        ]);
    }
    if spec.volume.is_some() {
        let nbd = tern_disk::daemon::DiskPaths::in_dir(&paths.dir).nbd;
        push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name=d0,server.type=unix,server.path={},export={}",
                qemu_escape(&nbd),
                tern_disk::daemon::EXPORT
            ),
            "-device",
            "virtio-blk-pci,drive=d0",
        ]);
    }
    if let Some(sock) = &spec.net_socket {
        push(&[
            "-netdev",
            &format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                qemu_escape(sock)
            ),
            "-device",
            // romfile= (empty): no PXE option ROM, which would only slow the boot and be
            // one more thing both ends of a migration must agree on.
            &format!(
                "virtio-net-pci,netdev=n0,mac={},romfile=",
                spec.mac_or_default()
            ),
        ]);
    }
    if let Some(uri) = incoming {
        push(&["-incoming", uri]);
    }
    if paused {
        push(&["-S"]);
    }
    push(&["-pidfile", &paths.pidfile.to_string_lossy(), "-daemonize"]);
    a
}

fn check_token(what: &'static str, s: &str, max: usize) -> Result<(), VmError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(VmError::Invalid {
            what,
            reason: format!("{s:?} (1..={max} of letters, digits, '-', '_', '.')"),
        })
    }
}

fn check_incoming_uri(uri: &str) -> Result<(), VmError> {
    if uri.is_empty() || uri.contains(char::is_whitespace) {
        return Err(VmError::Invalid {
            what: "incoming URI",
            reason: format!("{uri:?}"),
        });
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), VmError> {
    let bad = |reason| {
        Err(VmError::BadName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return bad("1..=32 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("use letters, digits, '-' and '_'");
    }
    Ok(())
}

fn check_site(site: &str) -> Result<(), VmError> {
    let ok = !site.is_empty()
        && site.len() <= 16
        && site.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VmError::BadSite(site.into()))
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    if path.exists() {
        Ok(())
    } else {
        Err(VmError::MissingFile {
            what,
            path: path.to_path_buf(),
        })
    }
}

/// Checks everything about a spec that does not depend on other VMs.
pub fn validate(spec: &VmSpec) -> Result<(), VmError> {
    check_name(&spec.name)?;
    check_site(&spec.site)?;
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&spec.mem_mib) {
        return Err(VmError::MemOutOfRange {
            mem_mib: spec.mem_mib,
        });
    }
    if !(1..=MAX_SMP).contains(&spec.smp) {
        return Err(VmError::Invalid {
            what: "vCPU count",
            reason: format!("{} (1..={MAX_SMP})", spec.smp),
        });
    }
    if let Some(w) = &spec.workload {
        check_token("workload", w, 64)?;
    }
    if let Some(m) = spec.workload_mib
        && (m == 0 || m >= spec.mem_mib)
    {
        return Err(VmError::Invalid {
            what: "workload size",
            reason: format!("{m} MiB (1..{} MiB, below guest memory)", spec.mem_mib),
        });
    }
    if spec.workload_rate_mb_s == Some(0) {
        return Err(VmError::Invalid {
            what: "workload rate",
            reason: "0 MB/s (leave it out for the guest's default)".into(),
        });
    }
    if let Some(a) = &spec.append
        && a.contains(['\n', '\r', '\0'])
    {
        return Err(VmError::Invalid {
            what: "kernel command line",
            reason: "it contains a line break or NUL".into(),
        });
    }
    let cmdline = kernel_cmdline(spec).len();
    if cmdline > MAX_CMDLINE_BYTES {
        return Err(VmError::Invalid {
            what: "kernel command line",
            reason: format!("{cmdline} bytes, at most {MAX_CMDLINE_BYTES}"),
        });
    }
    check_file("kernel", &spec.kernel)?;
    check_file("initrd", &spec.initrd)?;
    if spec.disk.is_some() && spec.volume.is_some() {
        return Err(VmError::Invalid {
            what: "disk",
            reason: "a VM has either a disk image or a tern volume, not both".into(),
        });
    }
    if let Some(v) = &spec.volume {
        check_file("volume", v)?;
    }
    if spec.gate && (spec.volume.is_none() || spec.net_socket.is_none()) {
        return Err(VmError::Invalid {
            what: "gate",
            reason: "output gating needs a tern volume and a NIC".into(),
        });
    }
    if let Some(d) = &spec.disk {
        check_file("disk image", d)?;
    }
    if let Some(s) = &spec.net_socket {
        check_file("network socket", s)?;
    }
    Ok(())
}

/// How sites map to namespaces.
#[derive(Debug, Clone)]
enum Sites {
    /// The cluster file's (read when needed: `tern lab up` may write it later): a site
    /// with a `netns` runs its VMs there (the lab), one without in this namespace.
    Cluster(Option<PathBuf>),
    /// Every instance runs in the caller's namespace; any site name (tests).
    Here,
}

/// A place VMs live: a state directory and a way to find each site's namespace.
#[derive(Debug, Clone)]
pub struct VmHost {
    root: PathBuf,
    sites: Sites,
}

/// `VmHost::lab().start(spec)`.
pub fn start(spec: &VmSpec) -> Result<VmInfo, VmError> {
    VmHost::lab().start(spec)
}

/// `VmHost::lab().start_incoming(..)`.
pub fn start_incoming(spec: &VmSpec, site: &str, incoming_uri: &str) -> Result<VmInfo, VmError> {
    VmHost::lab().start_incoming(spec, site, incoming_uri)
}

/// `VmHost::lab().list()`.
pub fn list() -> Result<Vec<VmInfo>, VmError> {
    VmHost::lab().list()
}

/// `VmHost::lab().stop(name)`.
pub fn stop(name: &str) -> Result<(), VmError> {
    VmHost::lab().stop(name)
}

/// `VmHost::lab().qmp(name, site)`.
pub fn qmp(name: &str, site: Option<&str>) -> Result<QmpClient, VmError> {
    VmHost::lab().qmp(name, site)
}

impl VmHost {
    /// VMs of the sites in the cluster file ([`tern_cluster::Cluster::locate`]: `explicit`,
    /// `$TERN_CLUSTER`, `/etc/tern/cluster.toml`, the lab's), state under its `vm_dir`
    /// ([`VM_RUN_DIR`] by default).
    pub fn cluster(explicit: Option<&Path>) -> VmHost {
        let root = tern_cluster::Cluster::load(explicit)
            .map(|c| c.vm_dir)
            .unwrap_or_else(|_| VM_RUN_DIR.into());
        VmHost {
            root,
            sites: Sites::Cluster(explicit.map(Path::to_path_buf)),
        }
    }

    /// [`VmHost::cluster`] with the cluster file found the usual way (in the lab, the one
    /// `tern lab up` wrote).
    pub fn lab() -> VmHost {
        VmHost::cluster(None)
    }

    /// VMs that run in the caller's own network namespace with state under `root`; site
    /// names are labels only. For tests that need no lab (and no root).
    pub fn unconfined(root: impl Into<PathBuf>) -> VmHost {
        VmHost {
            root: root.into(),
            sites: Sites::Here,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn paths(&self, name: &str, site: &str) -> InstancePaths {
        InstancePaths::new(&self.root, name, site)
    }

    /// Starts the primary instance of a new VM at `spec.site`. Refuses a name that has a
    /// live instance anywhere; instances left dead (a crash, `tern lab down`) are cleared.
    pub fn start(&self, spec: &VmSpec) -> Result<VmInfo, VmError> {
        self.launch(spec, &spec.site, None, false)
    }

    /// Starts the destination of a migration of `spec` at `site`, waiting for the stream
    /// at `incoming_uri` (`defer` for `migrate-incoming` later, `unix:PATH`, `fd:…`).
    /// `spec` is the machine as the source runs it ([`VmHost::record`]`.spec`), with
    /// `net_socket` set to the destination site's switch. The source instance may run
    /// meanwhile; the destination is listed with role `incoming` until [`promote`]d.
    ///
    /// [`promote`]: VmHost::promote
    pub fn start_incoming(
        &self,
        spec: &VmSpec,
        site: &str,
        incoming_uri: &str,
    ) -> Result<VmInfo, VmError> {
        check_incoming_uri(incoming_uri)?;
        self.launch(spec, site, Some(incoming_uri), false)
    }

    /// [`start_incoming`](VmHost::start_incoming), but the guest stays paused after the
    /// migration completes (QEMU `-S`) until someone sends `cont` — so its memory can be
    /// compared with the source's before it runs on.
    pub fn start_incoming_paused(
        &self,
        spec: &VmSpec,
        site: &str,
        incoming_uri: &str,
    ) -> Result<VmInfo, VmError> {
        check_incoming_uri(incoming_uri)?;
        self.launch(spec, site, Some(incoming_uri), true)
    }

    fn launch(
        &self,
        spec: &VmSpec,
        site: &str,
        incoming: Option<&str>,
        paused: bool,
    ) -> Result<VmInfo, VmError> {
        let mut spec = spec.clone();
        spec.site = site.to_string();
        validate(&spec)?;
        let (netns, gateway) = self.site_for(site)?;
        if spec.ip.is_some() {
            spec.gateway = gateway;
        }
        let name = spec.name.clone();
        let _lock = self.lock()?;

        // Clear dead instances; refuse live ones that conflict.
        for rec in self.records_of(&name)? {
            let alive = pid_alive(rec.pid, &rec.paths.qmp_socket);
            if !alive {
                remove_dir(&rec.paths.dir)?;
            } else if incoming.is_none() {
                return Err(VmError::AlreadyExists {
                    name,
                    site: rec.site,
                });
            } else if rec.site == site {
                return Err(VmError::InstanceExists {
                    name,
                    site: rec.site,
                });
            }
        }
        self.resolve_addresses(&mut spec)?;
        let disk_format = match &spec.disk {
            Some(d) => Some(
                DiskFormat::detect(d)
                    .map_err(io_err(format!("read disk image {}", d.display())))?,
            ),
            None => None,
        };

        let paths = self.paths(&name, site);
        fs::create_dir_all(paths.dir.parent().expect("instance dir has a parent"))
            .map_err(io_err(format!("create {}", self.root.display())))?;
        // Leftovers without a record (a start that crashed half-way) go first.
        if paths.dir.exists() && !paths.record.exists() {
            remove_dir(&paths.dir)?;
        }
        fs::create_dir(&paths.dir).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => VmError::InstanceExists {
                name: name.clone(),
                site: site.to_string(),
            },
            _ => io_err(format!("create {}", paths.dir.display()))(e),
        })?;
        let disk_paths = tern_disk::daemon::DiskPaths::in_dir(&paths.dir);
        let argv = if spec.gate {
            // QEMU's NIC connects to the disk server's gate, which goes on to the switch.
            let mut gated = spec.clone();
            gated.net_socket = Some(disk_paths.gate_nic.clone());
            guest_argv(&gated, &paths, disk_format, incoming, paused)
        } else {
            guest_argv(&spec, &paths, disk_format, incoming, paused)
        };
        let gate = spec.net_socket.clone().filter(|_| spec.gate).map(|switch| {
            tern_disk::daemon::GateStart {
                switch,
                mac: spec.mac_or_default().0,
                peers: spec
                    .gate_peers
                    .iter()
                    .map(|p| {
                        let mac = self
                            .record(p, Some(site))
                            .map(|r| r.spec.mac_or_default())
                            .unwrap_or_else(|_| MacAddr::for_name(p));
                        let dir = self.paths(p, site).dir;
                        (mac.0, tern_disk::daemon::DiskPaths::in_dir(&dir).counters)
                    })
                    .collect(),
            }
        });
        let result = match &spec.volume {
            // The volume's server first: QEMU connects to it at startup. A migration's
            // destination receives the replication stream as a secondary until promoted.
            Some(v) => tern_disk::daemon::start(
                &paths.dir,
                v,
                if incoming.is_some() {
                    tern_disk::server::Role::Secondary
                } else {
                    tern_disk::server::Role::Primary
                },
                tern_disk::Mode::Auto,
                gate.as_ref(),
            )
            .map_err(|e| VmError::Disk {
                name: name.clone(),
                site: site.to_string(),
                msg: e,
            })
            .and_then(|_| self.run_qemu(&spec, site, netns.as_deref(), &paths, &argv)),
            None => self.run_qemu(&spec, site, netns.as_deref(), &paths, &argv),
        };
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                tern_disk::daemon::stop(&paths.dir);
                let _ = remove_dir(&paths.dir);
                let _ = fs::remove_dir(paths.dir.parent().expect("parent"));
                return Err(e);
            }
        };
        let rec = InstanceRecord {
            version: RECORD_VERSION,
            spec,
            site: site.to_string(),
            netns,
            role: if incoming.is_some() {
                Role::Incoming
            } else {
                Role::Primary
            },
            incoming_uri: incoming.map(str::to_string),
            pid,
            paths,
            disk_format,
            argv,
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        write_record(&rec)?;
        // The instance counts as started once its monitor answers.
        let state = QmpClient::connect(&rec.paths.status_socket, QMP_START_TIMEOUT)
            .and_then(|mut c| query_status(&mut c));
        match state {
            Ok(state) => Ok(VmInfo::new(&rec, state)),
            Err(source) => {
                let _ = stop_record(&rec);
                Err(VmError::Qmp {
                    name: rec.spec.name,
                    site: rec.site,
                    source: Box::new(source),
                })
            }
        }
    }

    fn run_qemu(
        &self,
        spec: &VmSpec,
        site: &str,
        netns: Option<&str>,
        paths: &InstancePaths,
        argv: &[String],
    ) -> Result<u32, VmError> {
        let mut cmd = match netns {
            Some(ns) => tern_cluster::command_in(Some(ns), QEMU),
            None => Command::new(QEMU),
        };
        cmd.args(&argv[1..]).stdin(Stdio::null());
        let failed = |status: String, stderr: String| VmError::QemuFailed {
            name: spec.name.clone(),
            site: site.to_string(),
            status,
            stderr,
        };
        // With -daemonize QEMU returns once the machine is set up (or failed to be); the
        // daemon points its stdio at /dev/null, so `output` does not wait for the guest.
        let out = cmd
            .output()
            .map_err(|e| failed("not run".into(), format!("{QEMU}: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() {
            let _ = fs::write(&paths.qemu_log, &out.stderr);
            return Err(failed(out.status.to_string(), stderr));
        }
        let pid = fs::read_to_string(&paths.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| failed("no pid file".into(), stderr))?;
        Ok(pid)
    }

    /// Fills in `spec.ip` and `spec.mac` and checks neither is another VM's.
    fn resolve_addresses(&self, spec: &mut VmSpec) -> Result<(), VmError> {
        let others: Vec<InstanceRecord> = self
            .all_records()?
            .into_iter()
            .filter(|r| r.spec.name != spec.name)
            .collect();
        let ip_owner = |ip: Ipv4Addr| {
            others
                .iter()
                .find(|r| r.spec.ip.is_some_and(|o| o.addr == ip))
        };
        match spec.ip {
            Some(ip) => {
                if let Some(r) = ip_owner(ip.addr) {
                    return Err(VmError::IpInUse {
                        ip: ip.addr,
                        by: r.spec.name.clone(),
                    });
                }
            }
            None => {
                let [a, b, c, _] = GUEST_NET.octets();
                let free = (FIRST_GUEST_HOST..=254)
                    .map(|h| Ipv4Addr::new(a, b, c, h))
                    .find(|ip| ip_owner(*ip).is_none())
                    .ok_or(VmError::NoFreeIp)?;
                spec.ip = Some(Ipv4Cidr {
                    addr: free,
                    prefix: GUEST_PREFIX,
                });
            }
        }
        let mac = spec.mac_or_default();
        if let Some(r) = others.iter().find(|r| r.spec.mac_or_default() == mac) {
            return Err(VmError::MacInUse {
                mac,
                by: r.spec.name.clone(),
            });
        }
        spec.mac = Some(mac);
        Ok(())
    }

    /// Every instance of every VM, with its live state, by name then site.
    pub fn list(&self) -> Result<Vec<VmInfo>, VmError> {
        Ok(self
            .all_records()?
            .iter()
            .map(|r| VmInfo::new(r, live_state(r)))
            .collect())
    }

    /// The record of `name` at `site`; with `site` `None`, of its primary instance (or its
    /// only one).
    pub fn record(&self, name: &str, site: Option<&str>) -> Result<InstanceRecord, VmError> {
        check_name(name)?;
        let recs = self.records_of(name)?;
        if recs.is_empty() {
            return Err(VmError::NotFound(name.into()));
        }
        let found = match site {
            Some(s) => recs.iter().find(|r| r.site == s),
            None => recs
                .iter()
                .find(|r| r.role == Role::Primary)
                .or(if recs.len() == 1 { recs.first() } else { None }),
        };
        found.cloned().ok_or_else(|| VmError::NoInstance {
            name: name.into(),
            site: site.unwrap_or("(primary)").into(),
        })
    }

    /// A client on the control monitor of `name` (at `site`, or the primary instance).
    pub fn qmp(&self, name: &str, site: Option<&str>) -> Result<QmpClient, VmError> {
        let rec = self.record(name, site)?;
        QmpClient::connect(&rec.paths.qmp_socket, STATUS_TIMEOUT).map_err(|source| VmError::Qmp {
            name: name.into(),
            site: rec.site.clone(),
            source: Box::new(source),
        })
    }

    /// After a migration to `site` completed: stops every other instance of `name` and
    /// makes the one at `site` the primary.
    pub fn promote(&self, name: &str, site: &str) -> Result<VmInfo, VmError> {
        let _lock = self.lock()?;
        let mut dest = self.record(name, Some(site))?;
        if !pid_alive(dest.pid, &dest.paths.qmp_socket) {
            return Err(VmError::NoInstance {
                name: name.into(),
                site: format!("{site} (its QEMU is gone)"),
            });
        }
        for rec in self.records_of(name)? {
            if rec.site != site {
                stop_record(&rec)?;
            }
        }
        dest.role = Role::Primary;
        dest.incoming_uri = None;
        dest.spec.site = site.into();
        write_record(&dest)?;
        Ok(VmInfo::new(&dest, live_state(&dest)))
    }

    /// Stops every instance of `name` (QMP `quit`, then SIGKILL) and removes its state.
    pub fn stop(&self, name: &str) -> Result<(), VmError> {
        check_name(name)?;
        let dir = self.root.join(name);
        if !dir.exists() {
            return Err(VmError::NotFound(name.into()));
        }
        let _lock = self.lock()?;
        for rec in self.records_of(name)? {
            stop_record(&rec)?;
        }
        remove_dir(&dir)
    }

    /// Stops one instance (e.g. the destination of a failed migration).
    pub fn stop_instance(&self, name: &str, site: &str) -> Result<(), VmError> {
        let _lock = self.lock()?;
        let rec = self.record(name, Some(site))?;
        stop_record(&rec)?;
        let _ = fs::remove_dir(self.root.join(name)); // only if it was the last one
        Ok(())
    }

    /// Site `site`'s namespace (None: this one) and its guests' default gateway.
    fn site_for(
        &self,
        site: &str,
    ) -> Result<(Option<String>, Option<std::net::Ipv4Addr>), VmError> {
        match &self.sites {
            Sites::Here => Ok((None, None)),
            Sites::Cluster(explicit) => {
                let c = match tern_cluster::Cluster::load(explicit.as_deref()) {
                    Ok(c) => c,
                    Err(e @ tern_cluster::ClusterError::NotFound) => {
                        return Err(VmError::NoCluster(e.to_string()));
                    }
                    Err(e) => return Err(VmError::Cluster(e)),
                };
                let s = c.site(site).map_err(VmError::Cluster)?;
                if let Some(ns) = &s.netns
                    && !Path::new("/run/netns").join(ns).exists()
                {
                    return Err(VmError::NoNetns {
                        site: site.into(),
                        netns: ns.clone(),
                        path: c.path.clone(),
                    });
                }
                Ok((s.netns.clone(), s.overlay_gateway))
            }
        }
    }

    /// An exclusive `flock` on `ROOT/.lock` for as long as the file is held.
    fn lock(&self) -> Result<fs::File, VmError> {
        fs::create_dir_all(&self.root)
            .map_err(io_err(format!("create {}", self.root.display())))?;
        let path = self.root.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        loop {
            // SAFETY: flock on a descriptor `f` owns; the lock goes with the file's close.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(f);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(format!("lock {}", path.display()))(e));
            }
        }
    }

    fn records_of(&self, name: &str) -> Result<Vec<InstanceRecord>, VmError> {
        let dir = self.root.join(name);
        let mut out = Vec::new();
        for site in sorted_subdirs(&dir)? {
            let paths = InstancePaths::new(&self.root, name, &site);
            // An instance being started has no record yet.
            if let Some(rec) = read_record(&paths.record)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn all_records(&self) -> Result<Vec<InstanceRecord>, VmError> {
        let mut out = Vec::new();
        for name in sorted_subdirs(&self.root)? {
            if check_name(&name).is_ok() {
                out.extend(self.records_of(&name)?);
            }
        }
        Ok(out)
    }
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<String>, VmError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("read {}", dir.display()))(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn read_record(path: &Path) -> Result<Option<InstanceRecord>, VmError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
    };
    let v: Value = serde_json::from_str(&text).map_err(|source| VmError::Record {
        path: path.into(),
        source,
    })?;
    let found = v.get("version").and_then(Value::as_u64).unwrap_or(0);
    if found != u64::from(RECORD_VERSION) {
        return Err(VmError::RecordVersion {
            path: path.into(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
        });
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|source| VmError::Record {
            path: path.into(),
            source,
        })
}

/// Writes `spec.json` atomically (a reader sees the old or the new record, never half).
fn write_record(rec: &InstanceRecord) -> Result<(), VmError> {
    let tmp = rec.paths.dir.join("spec.json.tmp");
    let text = serde_json::to_string_pretty(rec).expect("a record serializes");
    let mut f = fs::File::create(&tmp).map_err(io_err(format!("write {}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .map_err(io_err(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, &rec.paths.record)
        .map_err(io_err(format!("write {}", rec.paths.record.display())))
}

fn remove_dir(dir: &Path) -> Result<(), VmError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
    }
}

/// True while `pid` is the QEMU of this instance: its command line names the instance's
/// own QMP socket, so a recycled pid (or a zombie, whose command line is empty) does not
/// count.
pub fn pid_alive(pid: u32, qmp_socket: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let needle = qmp_socket.to_string_lossy();
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains(QEMU) && c.contains(needle.as_ref())
    })
}

fn query_status(c: &mut QmpClient) -> Result<String, ClientError> {
    let r = c.execute("query-status", Value::Null)?;
    Ok(r["status"].as_str().unwrap_or("unknown").to_string())
}

fn live_state(rec: &InstanceRecord) -> String {
    if !pid_alive(rec.pid, &rec.paths.qmp_socket) {
        return "dead".into();
    }
    QmpClient::connect(&rec.paths.status_socket, STATUS_TIMEOUT)
        .and_then(|mut c| {
            c.set_command_timeout(STATUS_TIMEOUT);
            query_status(&mut c)
        })
        .unwrap_or_else(|_| "unresponsive".into())
}

fn wait_gone(rec: &InstanceRecord, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(rec.pid, &rec.paths.qmp_socket) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// Ends one instance's QEMU (`quit` on the status monitor, SIGKILL if that does not do
/// it) and removes its directory.
fn stop_record(rec: &InstanceRecord) -> Result<(), VmError> {
    if pid_alive(rec.pid, &rec.paths.qmp_socket) {
        let quit =
            QmpClient::connect(&rec.paths.status_socket, STATUS_TIMEOUT).and_then(|mut c| {
                c.set_command_timeout(STATUS_TIMEOUT);
                c.execute("quit", Value::Null)
            });
        if quit.is_err() || !wait_gone(rec, QUIT_TIMEOUT) {
            // SAFETY: kill of a pid whose command line was just checked to be this
            // instance's QEMU (pid_alive inside wait_gone).
            unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGKILL) };
            if !wait_gone(rec, KILL_TIMEOUT) {
                return Err(VmError::NotStopped {
                    name: rec.spec.name.clone(),
                    site: rec.site.clone(),
                    pid: rec.pid,
                });
            }
        }
    }
    tern_disk::daemon::stop(&rec.paths.dir);
    remove_dir(&rec.paths.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("web1", "a");
        s.ip = Some("198.18.100.10/24".parse().unwrap());
        s.gateway = Some("198.18.100.1".parse().unwrap());
        s
    }

    fn argv(spec: &VmSpec, incoming: Option<&str>) -> Vec<String> {
        let paths = InstancePaths::new(Path::new("/run/tern/vm"), &spec.name, &spec.site);
        guest_argv(
            spec,
            &paths,
            Some(DiskFormat::Qcow2),
            incoming,
            incoming.is_some(),
        )
    }

    fn value_of<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn argv_has_nodefaults_tcg_and_ram_off_the_256k_grid() {
        let a = argv(&spec(), None);
        assert_eq!(a[0], QEMU);
        assert!(a.iter().any(|x| x == "-nodefaults"));
        assert!(a.iter().any(|x| x == "-no-user-config"));
        assert!(a.iter().any(|x| x == "-daemonize"));
        assert_eq!(value_of(&a, "-machine"), ["pc,accel=tcg"]);
        assert_eq!(value_of(&a, "-smp"), ["1"]);
        assert_eq!(value_of(&a, "-display"), ["none"]);
        assert_eq!(value_of(&a, "-m"), ["524292K"]);
        assert_eq!(value_of(&a, "-kernel"), [DEFAULT_KERNEL]);
        assert_eq!(value_of(&a, "-initrd"), [DEFAULT_INITRD]);
        assert_eq!(
            value_of(&a, "-serial"),
            ["file:/run/tern/vm/web1/a/serial.log"]
        );
        assert_eq!(
            value_of(&a, "-qmp"),
            [
                "unix:/run/tern/vm/web1/a/qmp.sock,server=on,wait=off",
                "unix:/run/tern/vm/web1/a/qmp-status.sock,server=on,wait=off"
            ]
        );
        assert_eq!(value_of(&a, "-pidfile"), ["/run/tern/vm/web1/a/qemu.pid"]);
        assert!(value_of(&a, "-incoming").is_empty());
        assert!(!a.iter().any(|x| x == "-S"), "a primary runs at once");
        assert!(
            value_of(&a, "-netdev").is_empty(),
            "no NIC without a socket"
        );
        assert!(value_of(&a, "-drive").is_empty());
        for mem_mib in [MIN_MEM_MIB, 256, 512, 1000, 1024, 4096, MAX_MEM_MIB] {
            let kib = ram_kib(mem_mib);
            assert_ne!(kib % 256, 0, "{mem_mib} MiB");
            assert_eq!(kib % 4, 0, "page aligned");
            assert!(kib / 1024 == u64::from(mem_mib), "{mem_mib} MiB");
        }
    }

    #[test]
    fn argv_network_disk_and_incoming() {
        let mut s = spec();
        s.net_socket = Some("/run/tern/lab/switch-a.sock".into());
        s.disk = Some("/var/lib/img,1.qcow2".into());
        s.mac = Some("52:54:00:aa:bb:cc".parse().unwrap());
        let a = argv(&s, Some("unix:/run/tern/vm/web1/b/incoming.sock"));
        assert_eq!(
            value_of(&a, "-netdev"),
            ["stream,id=n0,server=off,addr.type=unix,addr.path=/run/tern/lab/switch-a.sock"]
        );
        assert_eq!(
            value_of(&a, "-device"),
            [
                "virtio-blk-pci,drive=d0",
                "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,romfile="
            ]
        );
        // A comma in a path is doubled, QEMU's escape.
        assert_eq!(
            value_of(&a, "-drive"),
            ["if=none,id=d0,file=/var/lib/img,,1.qcow2,format=qcow2"]
        );
        assert_eq!(
            value_of(&a, "-incoming"),
            ["unix:/run/tern/vm/web1/b/incoming.sock"]
        );
        assert!(a.iter().any(|x| x == "-S"), "paused destination");
        // -daemonize stays last, after -incoming.
        assert_eq!(a.last().unwrap(), "-daemonize");
    }

    #[test]
    fn kernel_cmdline_carries_the_guest_keys() {
        let mut s = spec();
        assert_eq!(
            kernel_cmdline(&s),
            "console=ttyS0 quiet tern.ip=198.18.100.10/24 tern.gw=198.18.100.1 tern.workload=idle \
             tern.mem_mb=1"
        );
        s.workload = Some("web-db".into());
        s.workload_rate_mb_s = Some(20);
        s.seed = Some(7);
        s.append = Some(" loglevel=4 ".into());
        assert_eq!(
            kernel_cmdline(&s),
            "console=ttyS0 quiet tern.ip=198.18.100.10/24 tern.gw=198.18.100.1 \
             tern.workload=web-db tern.mem_mb=358 tern.rate=20 tern.seed=7 loglevel=4"
        );
        s.workload_mib = Some(100);
        assert!(kernel_cmdline(&s).contains(" tern.mem_mb=100 "));
        let a = argv(&s, None);
        assert_eq!(value_of(&a, "-append"), [kernel_cmdline(&s).as_str()]);
    }

    #[test]
    fn mac_is_derived_from_the_name_and_stable() {
        let m = MacAddr::for_name("web1");
        assert_eq!(m, MacAddr::for_name("web1"));
        assert_ne!(m, MacAddr::for_name("web2"));
        assert_eq!(m.0[..3], [0x52, 0x54, 0x00]);
        // Pinned: a change of the hash would change every VM's MAC (and its DHCP/ARP state).
        assert_eq!(m.to_string(), "52:54:00:ea:40:40");
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        for bad in [
            "52:54:00:ab:6b",
            "52:54:00:ab:6b:zz",
            "01:00:5e:00:00:01",
            "5254.00ab.6ba8",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_parses_and_round_trips() {
        let c: Ipv4Cidr = "198.18.100.23/24".parse().unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(198, 18, 100, 23));
        assert_eq!(c.to_string(), "198.18.100.23/24");
        assert_eq!("198.18.100.23".parse::<Ipv4Cidr>().unwrap(), c);
        for bad in ["198.18.100/24", "198.18.100.1/33", "198.18.100.1/x", "host"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&spec()).unwrap();
        assert!(json.contains("\"ip\":\"198.18.100.10/24\""), "{json}");
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec());
    }

    #[test]
    fn validation_gives_clear_errors() {
        let dir = std::env::temp_dir().join(format!("tern-vm-validate-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        fs::write(&kernel, b"k").unwrap();
        let mut ok = spec();
        ok.kernel = kernel.clone();
        ok.initrd = kernel.clone();
        validate(&ok).unwrap();
        let case = |f: &dyn Fn(&mut VmSpec), want: &str| {
            let mut s = ok.clone();
            f(&mut s);
            let err = validate(&s).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        };
        case(&|s| s.name = "".into(), "1..=32 characters");
        case(&|s| s.name = "x".repeat(33), "1..=32 characters");
        case(&|s| s.name = "-web".into(), "start with a letter or digit");
        case(&|s| s.name = "web/1".into(), "letters, digits");
        case(&|s| s.name = "wéb".into(), "letters, digits");
        case(&|s| s.site = "a b".into(), "invalid site name");
        case(&|s| s.mem_mib = 32, "out of range (64..=16384 MiB)");
        case(&|s| s.mem_mib = 20000, "out of range");
        case(&|s| s.smp = 0, "vCPU count");
        case(&|s| s.kernel = dir.join("nope"), "kernel");
        case(&|s| s.initrd = dir.join("nope"), "initrd");
        case(&|s| s.disk = Some(dir.join("nope")), "disk image");
        case(&|s| s.net_socket = Some(dir.join("nope")), "network socket");
        case(&|s| s.workload = Some("web db".into()), "invalid workload");
        case(&|s| s.workload_mib = Some(512), "workload size");
        case(&|s| s.workload_rate_mb_s = Some(0), "workload rate");
        case(&|s| s.append = Some("a\nb".into()), "line break");
        case(&|s| s.append = Some("x".repeat(2100)), "at most 2047");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_format_by_magic() {
        let dir = std::env::temp_dir().join(format!("tern-vm-disk-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let q = dir.join("q");
        fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let r = dir.join("r");
        fs::write(&r, [0u8; 512]).unwrap();
        let tiny = dir.join("t");
        fs::write(&tiny, b"QF").unwrap();
        assert_eq!(DiskFormat::detect(&q).unwrap(), DiskFormat::Qcow2);
        assert_eq!(DiskFormat::detect(&r).unwrap(), DiskFormat::Raw);
        assert_eq!(DiskFormat::detect(&tiny).unwrap(), DiskFormat::Raw);
        assert!(DiskFormat::detect(&dir.join("none")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
